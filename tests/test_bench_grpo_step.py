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
