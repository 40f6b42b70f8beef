"""A training run directory that is never half-written: complete checkpoints, resume, and failed starts undone.

What train_grpo.py writes into OUT and what it and adapters/adapter_evaluation.py read back:
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
- `check_run_dir`: a run writes only into a new or empty directory or one of its own runs (marked by
  run_config.json); anything else is refused by name before a model loads, and a run is never overwritten;
  --resume picks the checkpoint, and refuses to start a run that has trained again from step 0;
  `finished_message` (and `finish_run`) a run that is done;
- `checkpoint_problem`: one check of a checkpoint's files (sizes, safetensors headers, JSON, the optimiser's and
  RNG states' archives) before it counts, for --resume and for keeping the best checkpoint's adapter;
- every file a run writes follows the umask (`follow_umask`), as other programs' files do;
- `read_run_config`: the settings a run was started with (run_config.json), for --resume;
- `run_files_present` / `forget_failed_start`: a start that failed before its first optimiser step leaves OUT as
  it found it, so that the same command can simply be run again.
"""

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from gpu_engine.mxfp4 import CheckpointError, read_safetensors_header
from output_files import why_not_writable

# -----------------------------------------------------------------------------
RUN_CONFIG = "run_config.json"  # the resolved settings of a run; it marks a directory as a run of this project
RUN_FILES = (RUN_CONFIG, "adapter_config.json", "completions.csv")  # any of these marks a directory as a run
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # checkpoint directory names; the number is the optimiser step
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                    "scheduler.pt")  # what a checkpoint needs for --resume (trainer_state.json is written last)
PARTIAL = ".checkpoint-partial-"  # prefix of the hidden directories checkpoints are written into
FINAL_PARTIAL = ".final-partial-"  # prefix of the hidden directory the final adapter is written into
STARTED_FILES = (RUN_CONFIG, "completions.csv", "logs", "README.md")  # written by a start before its first step
TRAINED_FILES = ("adapter_model.safetensors", "summary.json")  # written by a run that trained to its end
FOREIGN_SHOWN = 5  # entries of a foreign directory named in the refusal
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # what makes a directory an adapter
RUN_STATE_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json")  # not an adapter's
# -----------------------------------------------------------------------------


class RunDirectoryError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def check_run_dir(out, resume, log, tidy=True):
    """Where a run may write: a new or empty directory, or one of its own runs (run_config.json, or the files of a
    run from before that marker); a run is never overwritten: continue it with --resume or pick another --out.

    Returns the (step, path) of the last complete checkpoint to resume from, or None (a new run; or a resumed run
    that stopped before it saved anything, which starts again from step 0). A resumed run that has trained (a
    checkpoint directory, its final adapter or summary) but has no checkpoint that passes `checkpoint_problem` is
    refused rather than trained again from step 0 over what it holds. With --resume, `tidy` removes what interrupted
    saves left; of several processes only the main one tidies, the others only look.
    """
    out = Path(out)
    reason = why_not_writable(out, directory=True)
    if reason:
        raise RunDirectoryError(f"--out: {reason}")
    complete, skipped = list_checkpoints(out)
    holds_run = any((out / name).exists() for name in RUN_FILES) or bool(complete or skipped)
    if not holds_run and out.is_dir() and any(out.iterdir()):
        entries = sorted(entry.name for entry in out.iterdir())
        shown = ", ".join(entries[:FOREIGN_SHOWN]) + (f" and {len(entries) - FOREIGN_SHOWN} more"
                                                     if len(entries) > FOREIGN_SHOWN else "")
        raise RunDirectoryError(f"--out {out} holds files that are not a run of this project ({shown}); a run "
                                f"writes only into a new or empty directory or one of its own runs (they hold "
                                f"{RUN_CONFIG}), so nothing there is touched: choose another --out")
    if holds_run and not resume:
        raise RunDirectoryError(f"{out} already holds a run; continue it with --resume, or choose another --out")
    if not resume:
        return None
    if tidy:
        remove_partial_checkpoints(out, log)
    checkpoint = last_complete_checkpoint(out, log)
    if checkpoint is None:
        trained = [name for name in TRAINED_FILES if (out / name).is_file()] + [path.name for path, _ in skipped]
        if trained:
            raise RunDirectoryError(
                f"--resume: {out} has trained ({', '.join(trained)}) but holds no checkpoint that can be continued"
                + "".join(f"; {path.name}: {why}" for path, why in skipped)
                + f". It is not started again from step 0, which would write over its results: start a new run "
                  "with another --out")
        log(f"{out} has no complete checkpoint: the run starts again from step 0, with its settings")
    return checkpoint


def install_adapter(checkpoint, last_checkpoint, out):
    """A checkpoint's adapter (weights, config, tokenizer, nested adapters such as TRL's `ref/`) into OUT as the run's
    final adapter, with the last checkpoint's trainer_state.json, as save_final_atomically lays them out: staged
    beside, then moved in (adapter_config.json last)."""
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=FINAL_PARTIAL, dir=out))
    for entry in Path(checkpoint).iterdir():
        if entry.name in RUN_STATE_FILES or entry.name.startswith("rng_state"):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
    shutil.copy2(Path(last_checkpoint) / "trainer_state.json", staging / "trainer_state.json")
    move_into(staging, out)


def list_checkpoints(out):
    """([(step, path)] of complete checkpoints by step, [(path, why)] of the checkpoint-* entries that are not)."""
    complete, skipped = [], []
    for path in sorted(Path(out).glob("checkpoint-*")):
        match = CHECKPOINT.fullmatch(path.name)
        if not match or not path.is_dir():
            skipped.append((path, "not a checkpoint directory"))
            continue
        if not any(path.iterdir()):
            skipped.append((path, "empty (an interrupted save?)"))
            continue
        problem = checkpoint_problem(path)
        if problem:
            skipped.append((path, problem))
            continue
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
        if step != int(match[1]):
            skipped.append((path, f"its trainer_state.json is of step {step}"))
            continue
        complete.append((step, path))
    return sorted(complete), skipped


def checkpoint_problem(path, adapter_only=False):
    """Why the checkpoint directory `path` cannot be resumed from (or, `adapter_only`, its adapter used), or None:
    every file of
    CHECKPOINT_FILES present and not empty, trainer_state.json a JSON object with a global_step, adapter_config.json
    JSON, each safetensors file's header readable and its data all there, each .pt / .pth file (torch's zip
    archives: optimiser, scheduler, RNG states) an archive whose every member matches its checksum (a read of the
    file: ~1 s for a 20b expert LoRA's 3 GB optimiser state)."""
    path = Path(path)
    needed = ADAPTER_FILES if adapter_only else CHECKPOINT_FILES
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        return f"incomplete, no {', '.join(missing)} (an interrupted save?)"
    for file in [path / name for name in ADAPTER_FILES] if adapter_only else sorted(path.iterdir()):
        if not file.is_file():
            continue
        if file.stat().st_size == 0:
            return f"{file.name} is empty (an interrupted save?)"
        try:
            if file.suffix == ".json":
                data = json.loads(file.read_text(encoding="utf-8"))
                if file.name == "trainer_state.json" and not isinstance(data.get("global_step"), int):
                    return "trainer_state.json holds no global_step"
            elif file.suffix == ".safetensors":
                read_safetensors_header(str(file))
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:  # every member's checksum (torch stores them uncompressed)
                        raise zipfile.BadZipFile("a member's checksum does not match")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, zipfile.BadZipFile, CheckpointError) as error:
            return f"{file.name} is unreadable ({type(error).__name__}; an interrupted save or a broken copy?)"
    return None


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
    move_into(staging, out)


def move_into(staging, out):
    """Move every file under `staging` to the same place under `out` (adapter_config.json files last, so a directory
    holding one holds a whole adapter), give what was written the umask's modes, and remove `staging`. A file of the
    same name is replaced; nothing else under `out` is touched: files a person put into a nested directory (`ref/`)
    stay."""
    staging, out = Path(staging), Path(out)
    follow_umask(staging)
    files = sorted((path for path in staging.rglob("*") if path.is_file()),
                   key=lambda path: (path.name == "adapter_config.json", str(path)))
    for path in files:
        target = out / path.relative_to(staging)
        for parent in reversed(target.relative_to(out).parents[:-1]):
            if not (out / parent).is_dir():
                (out / parent).mkdir()
                follow_umask(out / parent)
        os.replace(path, target)
    shutil.rmtree(staging)


def follow_umask(path):
    """Give `path` and everything under it the modes the umask gives new files and directories (0644 / 0755 with the
    usual 022): tempfile.mkdtemp makes directories 0700, and some writers make files 0600, which would keep a
    colleague in the same group from reading a run's adapter."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for entry in [path, *path.rglob("*")]:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


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
