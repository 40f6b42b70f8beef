"""A training run directory that is never half-written: complete checkpoints, resume, and failed starts undone.

What train_grpo.py writes into OUT and what it and adapter_evaluation.py read back:
- `checkpoint-<step>/` is complete or absent: the trainer writes one file by file, so grpo_trainer.TesGRPOTrainer
  makes it write into a hidden `.checkpoint-partial-*` directory beside it and renames that into place when the
  last file (trainer_state.json) is written. A kill mid-save leaves only the hidden directory, which the next
  --resume removes (`remove_partial_checkpoints`, also for the final adapter's `.final-partial-*`). Under
  `accelerate launch` every process writes its part of a checkpoint into the same hidden directory, and the main
  process renames it once all are done; everything else here is the main process's to write;
- `list_checkpoints` tells complete checkpoints from the rest (empty, or left by an older version without the rename:
  no trainer_state.json, a missing optimiser file), so --resume continues from the last complete one and says why
  it skipped the others;
- the final adapter is written the same way (`save_final_atomically`): beside OUT, then moved in file by file,
  adapter_config.json last (it marks a directory holding an adapter);
- `check_run_dir`: a run is never overwritten; --resume picks the checkpoint, `finished_message` a run that is done;
- `read_run_config`: the settings a run was started with (run_config.json), for --resume;
- `run_files_present` / `forget_failed_start`: a start that failed before its first optimiser step leaves OUT as
  it found it, so that the same command can simply be run again.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

# -----------------------------------------------------------------------------
RUN_CONFIG = "run_config.json"  # the resolved settings of a run
RUN_FILES = (RUN_CONFIG, "adapter_config.json", "completions.csv")  # any of these marks a directory as a run
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # checkpoint directory names; the number is the optimiser step
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                    "scheduler.pt")  # what a checkpoint needs for --resume (trainer_state.json is written last)
PARTIAL = ".checkpoint-partial-"  # prefix of the hidden directories checkpoints are written into
FINAL_PARTIAL = ".final-partial-"  # prefix of the hidden directory the final adapter is written into
STARTED_FILES = (RUN_CONFIG, "completions.csv", "logs", "README.md")  # written by a start before its first step
# -----------------------------------------------------------------------------


class RunDirectoryError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def check_run_dir(out, resume, log, tidy=True):
    """A run directory is never overwritten: continue it with --resume or pick another --out.

    Returns the (step, path) of the last complete checkpoint to resume from, or None (a new run; or a resumed
    run that stopped before its first complete checkpoint, which starts again from step 0). With --resume, `tidy`
    removes what interrupted saves left; of several processes only the main one tidies, the others only look.
    """
    from output_files import why_not_writable

    out = Path(out)
    reason = why_not_writable(out, directory=True)
    if reason:
        raise RunDirectoryError(f"--out: {reason}")
    holds_run = any((out / name).exists() for name in RUN_FILES) or bool(list_checkpoints(out)[0])
    if holds_run and not resume:
        raise RunDirectoryError(f"{out} already holds a run; continue it with --resume, or choose another --out")
    if not resume:
        return None
    if tidy:
        remove_partial_checkpoints(out, log)
    checkpoint = last_complete_checkpoint(out, log)
    if checkpoint is None:
        log(f"{out} has no complete checkpoint: the run starts again from step 0, with its settings")
    return checkpoint


def finished_message(out, step, total_steps):
    """What --resume says about a run whose last checkpoint is `step` if that is all of it (else None)."""
    if step < total_steps:
        return None
    out = Path(out)
    lines = [f"{out} is finished: its last checkpoint is step {step} of TOTAL_STEPS={total_steps}; nothing to do "
             "(to train it further, pass a larger --total-steps with --resume)."]
    if not (out / "adapter_model.safetensors").is_file():
        lines.append(f"Its final adapter was not saved; the adapter of step {step} is in "
                     f"{out / f'checkpoint-{step}'} (pass it as --adapter-path).")
    if not (out / "summary.json").is_file():
        lines.append("It has no summary (the final evaluation was interrupted); evaluate it with: "
                     f"python test_lora_adapter.py --adapter-path {out}")
    return "\n".join(lines)


def list_checkpoints(out):
    """([(step, path)] of complete checkpoints by step, [(path, why)] of the checkpoint-* entries that are not)."""
    complete, skipped = [], []
    for path in sorted(Path(out).glob("checkpoint-*")):
        match = CHECKPOINT.fullmatch(path.name)
        if not match or not path.is_dir():
            skipped.append((path, "not a checkpoint directory"))
            continue
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if missing:
            skipped.append((path, "empty (an interrupted save?)" if not any(path.iterdir()) else
                            f"incomplete, no {', '.join(missing)} (an interrupted save?)"))
            continue
        try:
            step = json.loads((path / "trainer_state.json").read_text())["global_step"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            skipped.append((path, f"incomplete, trainer_state.json unreadable ({type(error).__name__}; an "
                                  "interrupted save?)"))
            continue
        if step != int(match[1]):
            skipped.append((path, f"its trainer_state.json is of step {step}"))
            continue
        complete.append((step, path))
    return sorted(complete), skipped


def last_complete_checkpoint(out, log=None):
    """(step, path) of the newest complete checkpoint, or None; `log` hears about every one passed over."""
    complete, skipped = list_checkpoints(out)
    if log:
        newest = complete[-1][0] if complete else -1
        for path, why in skipped:
            number = CHECKPOINT.fullmatch(path.name)
            if not number or int(number[1]) > newest:
                log(f"skipping {path.name}: {why}")
    return complete[-1] if complete else None


def remove_partial_checkpoints(out, log):
    """Remove the hidden directories of checkpoint (or final adapter) saves that a kill interrupted."""
    for path in sorted(Path(out).glob(PARTIAL + "*")) + sorted(Path(out).glob(FINAL_PARTIAL + "*")):
        shutil.rmtree(path)
        log(f"removed {path.name}: a save that was interrupted")


def replace_path(source, target, trash):
    """Rename `source` to `target`, moving an existing `target` into the directory `trash` first."""
    if os.path.lexists(target):
        os.replace(target, Path(trash) / f"old-{Path(target).name}")
    os.replace(source, target)


def record_base(directory, base_model_id):
    """Write `base_model_id` as the base model of every adapter_config.json under `directory`.

    PEFT records the path the base was loaded from (an absolute path in this checkout); train_grpo.py records
    model_loader.portable_model_id instead, which another checkout resolves again. It is rewritten in the saved
    files only: while training, PEFT looks at the recorded base (its config.json) on every save.
    """
    for path in Path(directory).rglob("adapter_config.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_model_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save_final_atomically(trainer, tokenizer, out, base_model_id):
    """The trained adapter, tokenizer and trainer state into OUT: written beside it, then moved in file by file.

    adapter_config.json comes last: a directory holding it holds a whole adapter.
    """
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=FINAL_PARTIAL, dir=out))
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(str(staging))
    trainer.state.save_to_json(str(staging / "trainer_state.json"))
    record_base(staging, base_model_id)
    for name in sorted(os.listdir(staging), key=lambda name: name == "adapter_config.json"):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)


def read_run_config(out):
    """The settings stored in OUT/run_config.json; RunDirectoryError if it is missing or unreadable."""
    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        raise RunDirectoryError(f"--resume: {out} holds no run to continue (no {RUN_CONFIG}, no checkpoint-*); "
                                "start it without --resume")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"{path}: corrupt ({error}); it holds the run's settings, so --resume cannot "
                                "continue the run; start a new one with another --out") from None
    if not isinstance(stored, dict):
        raise RunDirectoryError(f"{path}: corrupt (not a JSON object); start a new run with another --out")
    return stored


def run_files_present(out):
    """The entries of STARTED_FILES that OUT holds now (taken before a start, for forget_failed_start)."""
    return {name for name in STARTED_FILES if os.path.lexists(Path(out) / name)}


def forget_failed_start(out, present_before, created_out):
    """Remove what a start that did not finish one optimiser step wrote into OUT, and OUT if it made it empty."""
    out = Path(out)
    for name in set(STARTED_FILES) - set(present_before):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    if created_out and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
