"""benchmarks/bench_grpo_step.py's run directories: every invocation its own, so a second run of the benchmark never
meets the first one's runs (train_grpo.py refuses a run directory that already holds a run)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_grpo_step", ROOT / "benchmarks" / "bench_grpo_step.py")
bench_grpo_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_grpo_step)


def test_each_invocation_runs_its_rows_in_a_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_grpo_step, "RUN_DIR", tmp_path)
    first = bench_grpo_step.invocation_directory(1_800_000_000)
    row = bench_grpo_step.row_directory(first, "engine, MXFP4 experts + expert LoRA")
    assert row.parent == first and first.parent == tmp_path
    assert row.name == "engine-MXFP4-experts-plus-expert-LoRA"
    row.mkdir(parents=True)  # the first invocation's row ran
    second = bench_grpo_step.invocation_directory(1_800_000_000)  # a second one, started in the same second
    assert second != first and not second.exists()
    assert bench_grpo_step.row_directory(second, "engine, MXFP4 experts + expert LoRA") != row
    later = bench_grpo_step.invocation_directory(1_800_000_060)
    assert later not in (first, second)


def test_a_row_whose_engine_fell_back_is_marked_in_the_table():
    """A row whose rollout engine went on without its compiled code or Triton kernels ran the slow plain path: the
    table says so under the figures, quoting the engine's line, so that the figures are not taken for the fast
    path's."""
    log = ("step 1/20 ...\n"
           "rollout engine: torch.compile (inductor) or the Triton kernels (attention, experts' combine) failed, "
           "decoding without them: ValueError: dense_matmul: ...\nstep 2/20 ...\n")
    fell_back = bench_grpo_step.engine_fallbacks(log)
    assert len(fell_back) == 1 and fell_back[0].startswith("rollout engine: torch.compile")
    assert bench_grpo_step.engine_fallbacks("rollout engine: 2 graphs captured\n") == []
    row = {"backend": "engine, MXFP4 experts", "steps": 20, "measured_steps": 19, "seconds_per_step": 5.34,
           "generation_seconds": 3.42, "update_seconds": 1.92, "generated_tokens_per_second": 2390.0,
           "completions_per_step": 32.0, "peak_gib": 20.0, "card": "NVIDIA H200", "engine_fell_back": fell_back,
           "experts_format": "mxfp4"}
    fast = dict(row, backend="engine (default)", engine_fell_back=[])
    table = bench_grpo_step.render([row, fast], ROOT / "runs" / "model", "tok")
    assert "**engine, MXFP4 experts: not the engine's fast path.**" in table and "ValueError: dense_matmul" in table
    assert "engine (default): not" not in table
    assert "| engine, MXFP4 experts | mxfp4 | 20 (19) | 5.34 |" in table  # which format a row ran is in the table


def test_the_growth_rows_give_completions_a_second_by_step_size():
    """Issue 34's growth: W's step (32 completions) beside 64 and 128, the rate of each in the table and in one line."""
    def row(name, completions, seconds):
        return {"backend": name, "steps": 4, "measured_steps": 3, "seconds_per_step": seconds,
                "generation_seconds": seconds / 2, "update_seconds": seconds / 2,
                "generated_tokens_per_second": 256 * completions / (seconds / 2), "completions_per_step": completions,
                "peak_gib": 20.0, "card": "NVIDIA H100 80GB HBM3", "engine_fell_back": [], "experts_format": "mxfp4"}

    growth = bench_grpo_step.GROWTH_ROWS
    assert bench_grpo_step.ROWS[growth[64]][0] == ["--prompts-per-step", "8", "--gradient-accumulation", "4"]
    assert bench_grpo_step.ROWS[growth[128]][0] == ["--prompts-per-step", "16", "--gradient-accumulation", "8"]
    table = bench_grpo_step.render([row(growth[32], 32.0, 4.0), row(growth[64], 64.0, 6.4),
                                    row(growth[128], 128.0, 12.8)], ROOT / "runs" / "model", "tok")
    assert "| 4096 | 8.0 | 20.0 |" in table  # 32 completions in 4 s
    assert "Completions a second by completions a step (the same micro-batch of 16): 32: 8.0, 64: 10.0, 128: 10.0." \
        in table


def run_main(monkeypatch, argv):
    import sys

    monkeypatch.setattr(sys, "argv", ["bench_grpo_step.py", *argv])
    return bench_grpo_step.main()


def test_bad_arguments_are_refused_before_any_row_runs(tmp_path, monkeypatch, capsys):
    import pytest

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ran = []
    monkeypatch.setattr(bench_grpo_step, "run_row", lambda *args, **kwargs: ran.append(args))
    for argv, message in ((["--max-gpu-memory-gib", "-1"], "--max-gpu-memory-gib must be 0 (no cap) or a number"),
                          (["--max-gpu-memory-gib", "nan"], "--max-gpu-memory-gib must be 0 (no cap) or a number"),
                          (["--model-dir", str(tmp_path / "nowhere")], "no model directory there")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(monkeypatch, ["--model-dir", str(model), "--out", str(tmp_path / "t.md"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not ran


def test_a_failed_row_fails_the_benchmark(tmp_path, monkeypatch):
    import pytest

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(bench_grpo_step, "RUN_DIR", tmp_path / "runs")
    monkeypatch.setattr(bench_grpo_step, "run_row", lambda name, *args, **kwargs: {
        "backend": name, "failed": "error: the GPU ran out of memory", "steps": 4, "max_gpu_memory_gib": 0})
    with pytest.raises(SystemExit, match="1 of 1 rows failed"):
        run_main(monkeypatch, ["--model-dir", str(model), "--out", str(tmp_path / "t.md"), "--rows", "generate"])
    assert "failed: error: the GPU ran out of memory" in (tmp_path / "t.md").read_text()
