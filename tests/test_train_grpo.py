"""train_grpo.py end to end on the tiny stand-in: what a run writes, refusing to overwrite, resuming after kills,
refusing settings that cannot work before anything is written."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import preloaded_python

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--tiny", "--total-steps", "3", "--save-steps", "2", "--eval-samples", "0", "--report-to", "tensorboard",
        "--validation-prompts", "16"]  # each checkpoint scored on 16 prompts, not the main job's 128
ENV = {"OMP_NUM_THREADS": "2", **os.environ}  # 2 threads unless the caller chose
# Runs train_grpo.main in a child process that kills itself with SIGKILL at a chosen point:
# KILL_AT=checkpoint:N  just before trainer_state.json (the last file) of checkpoint-N is written;
# KILL_AT=log:N         halfway through the text of a completion-log record of step N (a torn record).
KILLING_RUN = """
import csv, os, signal, sys
from transformers.trainer_callback import TrainerState

kind, step = os.environ["KILL_AT"].split(":")
if kind == "checkpoint":
    save = TrainerState.save_to_json
    def save_or_die(self, path):
        if os.path.basename(os.path.dirname(path)) == "checkpoint-" + step:
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, path)
    TrainerState.save_to_json = save_or_die
else:
    make_writer = csv.writer
    class DyingWriter:
        def __init__(self, f, *args, **kwargs):
            self.f, self.writer = f, make_writer(f, *args, **kwargs)
        def writerow(self, row):
            if str(row[0]) == step:
                self.f.write(",".join(str(x) for x in row)[:60])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return self.writer.writerow(row)
        def writerows(self, rows):
            for row in rows:
                self.writerow(row)
    csv.writer = DyingWriter
import train_grpo
train_grpo.main(sys.argv[1:])
"""


def python():
    """Runs of `python ...` in processes forked from one that has the training stack imported (tests/
    preloaded_python.py): each run is a process of its own, without the ~11 s of imports."""
    return preloaded_python.shared(ROOT, ENV)


def run_train(*args, env=None):
    return python().run(["train_grpo.py", *args], env={**ENV, **(env or {})})


def run_train_fresh(*args):
    """`python train_grpo.py` as a user starts it: a new interpreter (everything it prints, its own hash seed)."""
    return subprocess.run([sys.executable, str(ROOT / "train_grpo.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=ENV)


def run_killed(kill_at, *args):
    return python().run(["-c", KILLING_RUN, *args], env={**ENV, "KILL_AT": kill_at})


def read_log(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def log_steps(path):
    return [int(r["step"]) for r in read_log(path)]


def run_main(argv):
    """train_grpo.main in this process, expected to stop with a message; returns the message."""
    import train_grpo

    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(argv)
    return str(exit_info.value.code)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "short"
    result = run_train_fresh(*FAST, "--out", str(out))  # a new interpreter: the notices test reads all it prints
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def resumed_run(short_run, tmp_path_factory):
    """The short run as an older version or a kill left it: checkpoint-3 without trainer_state.json, an empty
    checkpoint-9, a last completion-log record cut off; resumed with only --out and a new --total-steps."""
    out = tmp_path_factory.mktemp("runs") / "resumed"
    shutil.copytree(short_run[0], out)
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    (out / "checkpoint-9").mkdir()
    with open(out / "completions.csv", "a", encoding="utf-8") as f:
        f.write('3,3,tes:17,"<|channel|>analysis<|message|>CO2 is hi')
    result = run_train("--resume", "--out", str(out), "--total-steps", "4")
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
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial checkpoint or adapter left
    config = json.loads((out / "run_config.json").read_text())
    assert config["TOTAL_STEPS"] == 3 and config["MODEL_ID"] == "tiny"
    model = PeftModel.from_pretrained(model_loader.load_model("tiny"), out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_adapters_record_their_base_so_that_another_checkout_finds_it(short_run):
    out, _ = short_run
    for path in (out / "adapter_config.json", out / "checkpoint-2" / "adapter_config.json"):
        assert json.loads(path.read_text())["base_model_name_or_path"] == "tiny"


def test_completion_log_has_one_group_per_prompt_and_no_prompt_twice(short_run):
    out, _ = short_run
    rows = read_log(out / "completions.csv")
    assert list(rows[0]) == ["step", "micro_step", "rank", "prompt_id", "completion", "parsed_action", "reward",
                             "optimal_action"]
    assert {r["rank"] for r in rows} == {"0"}  # one process
    from train_grpo import TINY_SETTINGS

    prompts, generations = TINY_SETTINGS["PROMPTS_PER_STEP"], TINY_SETTINGS["NUM_GENERATIONS"]
    assert len(rows) == 3 * prompts * generations  # steps x prompts per step x generations
    assert "<|channel|>" in rows[0]["completion"]  # Harmony markers kept
    prompt_ids = [r["prompt_id"] for r in rows]
    groups = [prompt_ids[i:i + generations] for i in range(0, len(prompt_ids), generations)]
    assert all(len(set(g)) == 1 for g in groups)
    assert len({g[0] for g in groups}) == len(groups) == 3 * prompts  # every group a different prompt
    for r in rows:
        assert (r["parsed_action"] == "") == (r["reward"] == "")


def test_completion_log_counts_steps_from_one_like_tensorboard_and_the_checkpoints(short_run):
    out, _ = short_run
    rows = read_log(out / "completions.csv")
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3]
    assert sorted({int(r["micro_step"]) for r in rows}) == [1, 2, 3]  # one micro-batch a step in the tiny setup
    logged = [e["step"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in e]
    assert logged == [1, 2, 3]


def test_an_existing_run_is_never_overwritten(short_run):
    out, _ = short_run
    before = (out / "completions.csv").read_bytes()
    message = run_main(FAST + ["--out", str(out)])
    assert "already holds a run" in message and "--resume" in message
    assert (out / "completions.csv").read_bytes() == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(short_run):
    out, _ = short_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_train("--resume", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is finished" in result.stdout and "step 3 of TOTAL_STEPS=3" in result.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_skips_incomplete_and_empty_checkpoints_and_says_which_it_continues_from(resumed_run):
    out, result = resumed_run
    assert "skipping checkpoint-3: incomplete, no trainer_state.json" in result.stdout
    assert "skipping checkpoint-9: empty" in result.stdout
    assert "resuming from checkpoint-2" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_resume_drops_a_torn_last_completion_record_and_the_rows_of_later_steps(resumed_run):
    import pandas as pd

    out, result = resumed_run
    assert "a last record cut off by a kill" in result.stdout
    steps = log_steps(out / "completions.csv")
    assert steps == sorted(steps) and [steps.count(s) for s in (1, 2, 3, 4)] == [32, 32, 32, 32]
    assert len(pd.read_csv(out / "completions.csv")) == 4 * 32


def test_every_checkpoint_is_scored_on_training_prompts_and_the_best_adapter_is_kept(short_run):
    out, result = short_run
    validation = json.loads((out / "validation.json").read_text())
    assert validation["split"] == "train" and validation["prompts"] > 0
    assert [entry["step"] for entry in validation["checkpoints"]] == [2, 3]
    assert "validation at step 2: reward" in result.stdout
    kept = json.loads((out / "summary.json").read_text())["kept"]
    best = max(reversed(validation["checkpoints"]), key=lambda entry: entry["score"])
    assert kept["step"] == best["step"] and kept["last_scores"]["step"] == 3
    # the run's adapter is the kept checkpoint's
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out / f"checkpoint-{kept['step']}" / "adapter_model.safetensors").read_bytes()
    assert f"Adapter kept: step {kept['step']} of 3" in (out / "summary.md").read_text()


def test_scoring_the_checkpoints_changes_nothing_in_the_training(short_run, tmp_path):
    out, _ = short_run
    unscored = tmp_path / "unscored"
    result = run_train(*FAST, "--out", str(unscored), "--validation-prompts", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (unscored / "validation.json").exists()
    assert (unscored / "completions.csv").read_bytes() == (out / "completions.csv").read_bytes()


def test_resume_keeps_the_scores_of_the_checkpoints_it_continues_from(resumed_run):
    out, _ = resumed_run
    validation = json.loads((out / "validation.json").read_text())
    assert [entry["step"] for entry in validation["checkpoints"]] == [2, 4]  # step 3's score went with step 3


def test_the_main_job_prints_its_own_lines_not_library_notices(short_run):
    _, result = short_run
    output = result.stdout + result.stderr
    for notice in ("is_gradient_checkpointing", "`gradient_checkpointing` is deprecated", "use_kernels",
                   "Loading weights", "FutureWarning"):
        assert notice not in output, notice


def test_resume_restores_the_runs_settings_and_names_the_flags_that_change_them(resumed_run):
    out, result = resumed_run
    assert "with the settings of its run_config.json; changed on the command line: TOTAL_STEPS 3 -> 4" in result.stdout
    assert "loading tiny" in result.stdout  # not the constants' openai/gpt-oss-20b
    config = json.loads((out / "run_config.json").read_text())
    assert config["MODEL_ID"] == "tiny" and config["TOTAL_STEPS"] == 4 and config["SAVE_STEPS"] == 2


def test_summary_after_a_resume_counts_the_steps_this_process_ran(resumed_run):
    out, _ = resumed_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["steps_this_process"] == 2
    assert summary["resumed_from"] == "checkpoint-2"
    assert "ran steps 3-4 (2 steps)" in (out / "summary.md").read_text()


def test_kills_during_a_checkpoint_save_and_a_completion_log_write_lose_nothing(tmp_path):
    out = tmp_path / "killed"
    args = ["--tiny", "--total-steps", "4", "--save-steps", "1", "--eval-samples", "0", "--report-to", "none",
            "--validation-prompts", "8", "--out", str(out)]
    killed = run_killed("checkpoint:2", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # complete or absent
    assert [p.name for p in out.glob(".checkpoint-partial-*")]

    killed = run_killed("log:3", "--resume", "--out", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "removed .checkpoint-partial-" in killed.stdout and "resuming from checkpoint-1" in killed.stdout
    assert not (out / "completions.csv").read_text().endswith("\n")  # the kill tore the last record

    result = run_train("--resume", "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "resuming from checkpoint-2" in result.stdout and "a last record cut off by a kill" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    steps = log_steps(out / "completions.csv")
    assert steps == sorted(steps) and [steps.count(s) for s in (1, 2, 3, 4)] == [32, 32, 32, 32]
    assert not list(out.glob(".*"))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    assert "no checkpoint" in run_main(FAST + ["--out", str(tmp_path / "nothing"), "--resume"])


def test_bad_data_is_reported_by_file_and_row_before_any_model_is_loaded(tmp_path, capsys):
    import pandas as pd

    source = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame.loc[0, "q_action_1"] = "n/a"  # the first data row: row 2 as a spreadsheet counts
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    message = run_main(FAST + ["--out", str(tmp_path / "run"), "--data-files", str(bad)])
    assert f"{bad}:2:" in message and "q_action_1" in message
    assert "loading" not in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_legacy_text_prompts_are_refused_with_the_conversion_command(tmp_path):
    legacy = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv"
    assert "convert_to_harmony.py" in run_main(FAST + ["--out", str(tmp_path / "run"), "--data-files", str(legacy)])


def test_inconsistent_batch_settings_name_the_settings(tmp_path):
    message = run_main(["--tiny", "--train-batch-size", "16", "--out", str(tmp_path / "run")])
    assert "TRAIN_BATCH_SIZE" in message and "GRADIENT_ACCUMULATION" in message


def test_a_reasoning_effort_other_than_the_prompts_is_refused(tmp_path):
    message = run_main(FAST + ["--out", str(tmp_path / "run"), "--reasoning-effort", "high"])
    assert "reasoning effort low" in message and "--reasoning-effort high" in message


@pytest.mark.parametrize("flags, message", [
    (["--max-prompt-len", "10"], "longer than MAX_PROMPT_LEN=10"),
    (["--total-steps", "0"], "--total-steps must be at least 1, got 0"),
    (["--total-steps", "-5"], "--total-steps must be at least 1, got -5"),
    (["--save-steps", "0"], "--save-steps must be at least 1, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a number above 0, got nan"),
    (["--learning-rate=-1e-5"], "--learning-rate must be a number above 0"),
    (["--temperature", "0"], "--temperature must be a number above 0, got 0.0"),
    (["--top-p", "1.5"], "--top-p must be a number above 0 and at most 1"),
    (["--report-to", "bogus"], "--report-to 'bogus' is not a tracker"),
    (["--loss-type", "bogus"], "--loss-type 'bogus' is not one of dapo"),
    (["--lora-targets", "foo,bar"], "--lora-targets: foo, bar names no module"),
    (["--train-split", "nope"], "no rows with split == 'nope'"),
    (["--eval-samples", "1", "--eval-split", "nope"], "no rows with split == 'nope'"),
    (["--lr-schedule", "linear"], "--lr-schedule 'linear' is not one of constant, cosine"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be a number at least 0 and at most 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["--max-grad-norm=-1"], "--max-grad-norm must be a number at least 0"),
    (["--validation-samples", "0"], "--validation-samples must be at least 1"),
    (["--experts-format", "fp8"], "--experts-format 'fp8' is not one of auto, bf16, mxfp4"),
    (["--max-gpu-memory-gib=-1"], "--max-gpu-memory-gib must be 0 (no cap) or a number of GiB"),
    (["--seed", "4294967296"], "--seed must be at most 4294967295 (numpy and TRL take 32-bit seeds)"),
    (["--seed", "18446744073709551616"], "--seed must be at most 4294967295"),
])
def test_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "run"
    assert message in run_main(FAST + ["--out", str(out)] + flags)
    assert not out.exists()  # so the same command, corrected, starts a run


def test_expert_lora_on_mxfp4_experts_trains_as_on_dequantised_experts(tmp_path):
    """--tiny trains an expert LoRA; with the experts kept in MXFP4 (its LoRA as low-rank terms beside the packed
    weights) the same seed samples the same answers and the 3 steps give the same adapter as on dequantised
    experts (PEFT's own W + BA), up to fp32 summation order: the CPU reference path is exact."""
    import torch
    from safetensors.torch import load_file

    adapters, logs = {}, {}
    for experts_format in ("bf16", "mxfp4"):
        out = tmp_path / experts_format
        result = run_train(*FAST, "--experts-format", experts_format, "--validation-prompts", "0", "--out", str(out))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        adapters[experts_format] = load_file(str(out / "adapter_model.safetensors"))
        logs[experts_format] = [row["completion"] for row in read_log(out / "completions.csv")]
        assert json.loads((out / "summary.json").read_text())["experts_format"] == experts_format
        assert f"experts: {experts_format})" in (out / "summary.md").read_text()
    assert logs["mxfp4"] == logs["bf16"]
    expert_b = [name for name in adapters["bf16"] if ".mlp.experts." in name and "lora_B" in name]
    assert len(expert_b) == 2 * 2 and all(adapters["mxfp4"][name].abs().max() > 0 for name in expert_b)  # trained
    assert adapters["mxfp4"].keys() == adapters["bf16"].keys()
    for name, tensor in adapters["bf16"].items():
        torch.testing.assert_close(adapters["mxfp4"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_the_learning_rate_follows_the_chosen_schedule_after_its_warm_up(tmp_path):
    """The schedule transformers builds from grpo_config: warm-up to the peak, then flat or a cosine to the floor."""
    import torch
    from transformers.optimization import get_scheduler

    import train_grpo

    settings = {name: getattr(train_grpo, name) for name in train_grpo.SETTINGS} | {
        "OUT": str(tmp_path), "TOTAL_STEPS": 100, "WARMUP_STEPS": 10, "LEARNING_RATE": 1e-3, "MIN_LR_RATIO": 0.1}

    def rates(schedule):
        config = train_grpo.grpo_config(settings | {"LR_SCHEDULE": schedule}, "cpu", "generate")
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=100, scheduler_specific_kwargs=config.lr_scheduler_kwargs)
        out = []
        for _ in range(100):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    constant, cosine = rates("constant"), rates("cosine")
    assert constant[0] == 0 and constant[5] == pytest.approx(5e-4) and constant[10:] == [pytest.approx(1e-3)] * 90
    assert cosine[10] == pytest.approx(1e-3) and cosine[-1] == pytest.approx(1e-4, rel=0.05)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))  # decays, never below the floor
    assert min(cosine[10:]) >= 1e-4 - 1e-12


def test_an_output_path_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is a file, not a directory" in run_main(FAST + ["--out", str(a_file)])
    assert "is a file, so nothing can be created under it" in run_main(FAST + ["--out", str(a_file / "run")])


def test_an_output_directory_that_cannot_be_written_is_refused(read_only_dir):
    assert "cannot be written" in run_main(FAST + ["--out", str(read_only_dir / "run")])


def test_a_model_id_that_is_not_a_model_directory_is_named(tmp_path):
    from tiny_gpt_oss import ensure_tiny_model

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    assert "no config.json in this directory" in run_main(FAST + ["--out", str(tmp_path / "a"), "--model-id",
                                                                  str(not_a_model)])
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(ensure_tiny_model(), no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "no tokenizer" in run_main(FAST + ["--out", str(tmp_path / "b"), "--model-id", str(no_tokenizer)])
    corrupt = tmp_path / "corrupt-config"
    shutil.copytree(ensure_tiny_model(), corrupt)
    (corrupt / "config.json").write_text('{"model_type": "gpt_oss",')
    message = run_main(FAST + ["--out", str(tmp_path / "c"), "--model-id", str(corrupt)])
    assert "config.json: corrupt" in message and "network" not in message
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "c")]


def wait_for(process, text, seconds=600):
    """Read the child's stdout until a line holds `text`; returns the lines read."""
    lines, deadline = [], time.time() + seconds
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n" + "".join(lines[-30:]))


def wait_for_log_rows(log, rows, seconds=600):
    """Wait until a running job's completion log holds at least `rows` rows (a few steps done)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if log.exists() and len(read_log(log)) >= rows:
            return
        time.sleep(0.5)


def start_train(*args):
    # the child takes Ctrl-C as a user's run does (preloaded_python restores Python's SIGINT handler), even where
    # pytest itself runs with SIGINT ignored (a shell's background job)
    return python().start(["train_grpo.py", *args], env=ENV)


def test_ctrl_c_before_training_starts_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    process = start_train(*FAST, "--out", str(out))
    wait_for(process, "loading tiny")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "interrupted before" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_during_the_final_evaluation_keeps_the_adapter_and_writes_the_summary(tmp_path):
    out = tmp_path / "run"
    process = start_train("--tiny", "--total-steps", "1", "--eval-samples", "2", "--out", str(out))
    wait_for(process, "held-out evaluation")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "interrupted during the final evaluation" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["held_out_interrupted"] is True
    assert "held-out evaluation was interrupted" in (out / "summary.md").read_text()


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(tmp_path):
    out = tmp_path / "interrupted"
    process = start_train("--tiny", "--total-steps", "200", "--save-steps", "1000", "--eval-samples", "0",
                          "--out", str(out))
    wait_for_log_rows(out / "completions.csv", 3 * 32)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "checkpoint saved" in stderr, stdout[-2000:] + stderr[-2000:]
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert step >= 2 and (checkpoint / "adapter_model.safetensors").is_file()
    result = run_train("--total-steps", str(step + 1), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 1


def test_sigterm_saves_a_checkpoint_as_ctrl_c_does_and_resume_loses_and_repeats_nothing(tmp_path):
    """What a scheduler or `kill` sends before SIGKILL: the same checkpoint and resume command as Ctrl-C."""
    out = tmp_path / "terminated"
    process = start_train("--tiny", "--total-steps", "200", "--save-steps", "1000", "--eval-samples", "0",
                          "--validation-prompts", "0", "--out", str(out))
    wait_for_log_rows(out / "completions.csv", 3 * 32)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "checkpoint saved" in stderr and "--resume" in stderr, stdout[-2000:] + stderr[-2000:]
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    result = run_train("--total-steps", str(step + 2), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    steps = log_steps(out / "completions.csv")
    assert steps == sorted(steps) and {s: steps.count(s) for s in set(steps)} == {s: 32 for s in range(1, step + 3)}


def test_out_of_memory_names_the_settings_that_reduce_memory(tmp_path, monkeypatch, capsys):
    import torch
    from trl import GRPOTrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # main sets it for its run: undone after the test

    monkeypatch.setattr(GRPOTrainer, "train", out_of_memory)
    message = run_main(FAST + ["--out", str(tmp_path / "run")])
    assert message.startswith("error: the GPU ran out of memory")
    for flag in ("--train-batch-size", "--gradient-accumulation", "--max-completion-len", "--num-generations"):
        assert flag in message
    assert not (tmp_path / "run").exists()  # a start that did no step leaves nothing: the same command can run again


def test_a_step_with_every_answer_invalid_prints_no_nan(capsys):
    """Such a step has no action reward (TRL logs None); the progress line says n/a instead of nan."""
    from types import SimpleNamespace

    from training import run_summary

    printer = run_summary.make_progress_printer(total_steps=2, every=1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    printer.on_train_begin(None, state, None)
    state.global_step = 1
    printer.on_log(None, state, None, logs={"reward": -1.0, "rewards/action_reward/mean": None, "valid_rate": 0.0,
                                            "accuracy": 0.0})
    line = capsys.readouterr().out
    assert "reward   n/a" in line and "valid 0.000" in line and "nan" not in line


REPRODUCIBLE_RUN = """
import sys
from pathlib import Path
import tiny_gpt_oss
tiny_gpt_oss.TINY_DIR = Path(sys.argv[1])  # a stand-in directory of this test's own, built when absent
tiny_gpt_oss.WARM_STEPS, tiny_gpt_oss.WARM_QUANTIZED_STEPS = 20, 5  # the build's own steps, fewer: what matters is
                                                                   #   that it runs in the training process
import train_grpo
train_grpo.main(["--tiny", "--total-steps", "12", "--save-steps", "12", "--eval-samples", "0",
                 "--validation-prompts", "0", "--out", sys.argv[2]])
"""


def test_runs_of_one_seed_give_identical_adapters_and_logs_even_when_one_builds_the_stand_in(tmp_path):
    """The README's first command on a fresh clone builds the stand-in inside the training process: that run, and
    one that finds it built, each in its own process, 12 steps of seed 42, give byte-identical adapters and
    completion logs (building the stand-in used to re-seed torch between the run's seeding and its LoRA
    initialisation, so a fresh clone's first run parted from every later one at step 5)."""
    stand_in = tmp_path / "stand-in"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    outputs = []
    for name in ("builds-the-stand-in", "finds-it"):
        out = tmp_path / name
        if name == "builds-the-stand-in":  # a new interpreter, as on a fresh clone: its own string-hash seed
            done = subprocess.run([sys.executable, "-c", REPRODUCIBLE_RUN, str(stand_in), str(out)], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=900)
        else:  # the preloaded server's child: another process with another hash seed, without ~11 s of imports
            done = python().run(["-c", REPRODUCIBLE_RUN, stand_in, out], env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(((out / "adapter_model.safetensors").read_bytes(), (out / "completions.csv").read_bytes()))
        if name == "builds-the-stand-in":
            assert "building the tiny stand-in" in done.stderr
    assert outputs[0] == outputs[1]


# -- a user's files, broken runs, odd environments -----------------------------------------------------------------
def tree(path):
    """{relative path: (bytes, or None for a directory)} of everything under `path`."""
    return {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(path).rglob("*"))}


def test_a_folder_of_the_users_own_is_refused_by_name_and_left_untouched(tmp_path):
    out = tmp_path / "my-notes"
    for name, text in (("README.md", "# my notes"), ("notes.txt", "todo"), ("logs/a.log", "x"),
                       ("results/r.csv", "1"), ("ref/papers.bib", "@article{x}")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(out)
    message = run_main(FAST + ["--out", str(out)])
    assert "holds files that are not a run of this project (README.md, logs, notes.txt, ref, results)" in message
    assert "choose another --out" in message and tree(out) == before


def test_an_empty_folder_is_a_new_runs_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    from training import run_directory

    assert run_directory.check_run_dir(out, resume=False, log=print) is None


def test_a_finished_run_whose_checkpoints_cannot_be_read_is_never_trained_again(short_run, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(short_run[0], out)
    for state in out.glob("checkpoint-*/trainer_state.json"):
        state.write_text("{not json")
    before = tree(out)
    message = run_main(["--resume", "--out", str(out)])
    assert "has trained (adapter_model.safetensors, summary.json, checkpoint-2, checkpoint-3)" in message
    assert "trainer_state.json is unreadable" in message and "not started again from step 0" in message
    assert tree(out) == before


@pytest.mark.parametrize("damage", ["truncated adapter", "empty adapter", "corrupt optimizer", "corrupt rng state"])
def test_a_checkpoint_with_a_damaged_file_does_not_count(short_run, tmp_path, damage):
    from training import run_directory

    out = tmp_path / "damaged"
    shutil.copytree(short_run[0], out)
    checkpoint = out / "checkpoint-3"
    name = {"truncated adapter": "adapter_model.safetensors", "empty adapter": "adapter_model.safetensors",
            "corrupt optimizer": "optimizer.pt", "corrupt rng state": "rng_state.pth"}[damage]
    data = bytearray((checkpoint / name).read_bytes())
    if damage == "empty adapter":
        data = b""
    elif damage in ("truncated adapter", "corrupt optimizer"):
        data = data[:len(data) // 2]  # a copy or a write cut off
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    (checkpoint / name).write_bytes(bytes(data))
    complete, skipped = run_directory.list_checkpoints(out)
    assert [step for step, _ in complete] == [2]
    assert skipped[0][0].name == "checkpoint-3" and name in skipped[0][1]
    assert run_directory.checkpoint_problem(out / "checkpoint-2") is None


def test_resume_continues_from_the_last_sound_checkpoint_and_records_its_settings_once_training_begins(short_run,
                                                                                                      tmp_path):
    out = tmp_path / "resumed-past-damage"
    shutil.copytree(short_run[0], out)
    optimizer = out / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # cut off
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (out / name).unlink()  # as a kill before the final save left it
    result = run_train("--resume", "--out", str(out), "--total-steps", "4")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skipping checkpoint-3: optimizer.pt is unreadable" in result.stdout
    assert "resuming from checkpoint-2 (step 2)" in result.stdout
    assert json.loads((out / "run_config.json").read_text())["TOTAL_STEPS"] == 4
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_a_refused_resume_leaves_the_runs_settings_as_they_were(short_run, tmp_path):
    out = tmp_path / "refused"
    shutil.copytree(short_run[0], out)
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    before = (out / "run_config.json").read_bytes()
    assert "not started again from step 0" in run_main(["--resume", "--out", str(out), "--total-steps", "6",
                                                        "--save-steps", "1"])
    assert (out / "run_config.json").read_bytes() == before


def test_every_file_and_directory_a_run_writes_follows_the_umask(short_run):
    umask = os.umask(0)
    os.umask(umask)
    out = short_run[0]
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != ((0o777 if (out / name).is_dir() else 0o666) & ~umask)}
    assert "checkpoint-3/adapter_model.safetensors" in modes and not wrong


# Runs train_grpo.main with a signal sent to itself at a chosen point (STOP_AT):
#   final:SIGNAL       as the final adapter's save begins (run_directory.save_final_atomically);
#   checkpoint:SIGNAL  a second SIGTERM while the interrupt's own checkpoint is being saved (after a first one).
SIGNALLED_RUN = """
import os, signal, sys
import train_grpo
from training import run_directory
where, name = os.environ["STOP_AT"].split(":")
number = getattr(signal, name)
if where == "final":
    save = run_directory.save_final_atomically
    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), number)
        if number == signal.SIGKILL:
            return
        save(*args, **kwargs)
    run_directory.save_final_atomically = signalled_save
else:
    from training import grpo_trainer
    save = grpo_trainer.TesGRPOTrainer.save_checkpoint_now
    def signalled_checkpoint(self):
        os.kill(os.getpid(), signal.SIGTERM)
        save(self)
    grpo_trainer.TesGRPOTrainer.save_checkpoint_now = signalled_checkpoint
    import transformers
    def first_signal(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    transformers.TrainerCallback.on_step_end = first_signal
train_grpo.main(sys.argv[1:])
"""


def run_signalled(stop_at, *args):
    return python().run(["-c", SIGNALLED_RUN, *args], env={**ENV, "STOP_AT": stop_at})


def test_sigterm_while_the_final_adapter_is_saved_waits_for_it_and_writes_the_summary(tmp_path):
    out = tmp_path / "terminated-at-the-end"
    result = run_signalled("final:SIGTERM", *FAST, "--out", str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "stopping once the final adapter is saved" in result.stderr
    assert "interrupted during saving the final adapter: the adapter is saved" in result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 3
    again = run_train("--resume", "--out", str(out))
    assert again.returncode == 0 and "is finished" in again.stdout


def test_a_kill_during_the_final_save_is_finished_by_resume_with_the_kept_checkpoint(tmp_path):
    out = tmp_path / "killed-at-the-end"
    killed = run_signalled("final:SIGKILL", *FAST, "--validation-prompts", "4", "--out", str(out))
    assert killed.returncode == -signal.SIGKILL and not (out / "adapter_config.json").exists()
    history = json.loads((out / "validation.json").read_text())["checkpoints"]
    best = max(reversed(history), key=lambda entry: entry["score"])["step"]
    result = run_train("--resume", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Its final adapter had not been saved: it is now, from checkpoint-{best}" in result.stdout
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out / f"checkpoint-{best}" / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_a_second_sigterm_during_the_interrupts_own_checkpoint_leaves_it_whole(tmp_path):
    out = tmp_path / "terminated-twice"
    result = run_signalled("checkpoint:SIGTERM", "--tiny", "--total-steps", "50", "--save-steps", "1000",
                           "--eval-samples", "0", "--validation-prompts", "0", "--out", str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "stopping once the checkpoint is saved" in result.stderr and "checkpoint saved" in result.stderr
    from training import run_directory

    complete, skipped = run_directory.list_checkpoints(out)
    assert complete and not skipped


def test_a_read_only_datasets_cache_is_replaced_by_a_temporary_one(read_only_dir, monkeypatch):
    import datasets.config

    import train_grpo

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", read_only_dir / "datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(read_only_dir / "datasets"))
    lines = []
    train_grpo.use_writable_caches(lines.append)
    chosen = Path(datasets.config.HF_DATASETS_CACHE)
    assert chosen != read_only_dir / "datasets" and chosen.is_dir() and os.environ["HF_DATASETS_CACHE"] == str(chosen)
    assert "the datasets cache cannot be written" in lines[0] and "set HF_DATASETS_CACHE" in lines[0]
