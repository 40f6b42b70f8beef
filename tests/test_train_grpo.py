"""train_grpo.py end to end on the tiny stand-in: what a run writes, refusing to overwrite, resuming."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--tiny", "--total-steps", "3", "--save-steps", "2", "--eval-samples", "0", "--report-to", "tensorboard"]


def run_train(*args, env=None):
    import os

    return subprocess.run([sys.executable, str(ROOT / "train_grpo.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})


def read_log(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "short"
    result = run_train(*FAST, "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_a_short_run_writes_a_loadable_adapter_and_its_records(short_run):
    from peft import PeftModel

    import model_loader

    out, _ = short_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json",
                 "run_config.json", "completions.csv", "summary.json", "summary.md"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "TensorBoard logs"
    config = json.loads((out / "run_config.json").read_text())
    assert config["TOTAL_STEPS"] == 3 and config["MODEL_ID"] == "tiny"
    model = PeftModel.from_pretrained(model_loader.load_model("tiny"), out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_completion_log_has_one_group_per_prompt_and_no_prompt_twice(short_run):
    out, _ = short_run
    rows = read_log(out / "completions.csv")
    assert list(rows[0]) == ["step", "micro_step", "prompt_id", "completion", "parsed_action", "reward",
                             "optimal_action"]
    assert len(rows) == 3 * 4 * 8  # steps x prompts per step x generations
    assert "<|channel|>" in rows[0]["completion"]  # Harmony markers kept
    prompt_ids = [r["prompt_id"] for r in rows]
    groups = [prompt_ids[i:i + 8] for i in range(0, len(prompt_ids), 8)]
    assert all(len(set(g)) == 1 for g in groups)
    assert len({g[0] for g in groups}) == len(groups)  # 12 groups, 12 different prompts
    for r in rows:
        assert (r["parsed_action"] == "") == (r["reward"] == "")


def test_an_existing_run_is_never_overwritten(short_run):
    out, _ = short_run
    before = (out / "completions.csv").read_bytes()
    result = run_train(*FAST, "--out", str(out))
    assert result.returncode != 0
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert (out / "completions.csv").read_bytes() == before


def test_resume_after_a_kill_continues_at_the_last_checkpoint_without_duplicate_log_rows(short_run, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(short_run[0], out)
    shutil.rmtree(out / "checkpoint-3")  # killed after step 3's rows were logged, before its checkpoint
    result = run_train("--tiny", "--total-steps", "4", "--save-steps", "2", "--eval-samples", "0",
                       "--out", str(out), "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from checkpoint-2" in result.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [int(r["step"]) for r in read_log(out / "completions.csv")]
    assert steps == sorted(steps) and [steps.count(s) for s in range(4)] == [32, 32, 32, 32]


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    result = run_train(*FAST, "--out", str(tmp_path / "nothing"), "--resume")
    assert result.returncode != 0 and "no checkpoint" in result.stderr


def test_bad_data_is_reported_by_file_and_row_before_any_model_is_loaded(tmp_path):
    import pandas as pd

    source = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame.loc[0, "q_action_1"] = "n/a"  # the first data row: row 2 as a spreadsheet counts
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    result = run_train(*FAST, "--out", str(tmp_path / "run"), "--data-files", str(bad))
    assert result.returncode != 0
    assert f"{bad}:2:" in result.stderr and "q_action_1" in result.stderr
    assert "loading" not in result.stdout
    assert not (tmp_path / "run").exists()


def test_legacy_text_prompts_are_refused_with_the_conversion_command(tmp_path):
    legacy = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv"
    result = run_train(*FAST, "--out", str(tmp_path / "run"), "--data-files", str(legacy))
    assert result.returncode != 0 and "convert_to_harmony.py" in result.stderr


def test_inconsistent_batch_settings_name_the_settings(tmp_path):
    result = run_train("--tiny", "--train-batch-size", "16", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "TRAIN_BATCH_SIZE" in result.stderr and "GRADIENT_ACCUMULATION" in result.stderr


def test_a_reasoning_effort_other_than_the_prompts_is_refused(tmp_path):
    result = run_train(*FAST, "--out", str(tmp_path / "run"), "--reasoning-effort", "high")
    assert result.returncode != 0
    assert "reasoning effort low" in result.stderr and "--reasoning-effort high" in result.stderr


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train_grpo.py"), "--tiny", "--total-steps", "200", "--save-steps", "1000",
         "--eval-samples", "0", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.time() + 600
    while time.time() < deadline:
        log = out / "completions.csv"
        if log.exists() and len(read_log(log)) >= 3 * 32:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "checkpoint saved" in stderr, stdout[-2000:] + stderr[-2000:]
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert step >= 2 and (checkpoint / "adapter_model.safetensors").is_file()
    result = run_train("--tiny", "--total-steps", str(step + 1), "--save-steps", "1000", "--eval-samples", "0",
                       "--out", str(out), "--resume")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 1


def test_out_of_memory_names_the_settings_that_reduce_memory(tmp_path, monkeypatch, capsys):
    import torch
    from trl import GRPOTrainer

    import train_grpo

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GRPOTrainer, "train", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(FAST + ["--out", str(tmp_path / "run")])
    message = str(exit_info.value)
    assert message.startswith("error: the GPU ran out of memory")
    for flag in ("--train-batch-size", "--gradient-accumulation", "--max-completion-len", "--num-generations"):
        assert flag in message
