"""Keep the best adapter of a GRPO run, judged on a validation slice of the training split.

A policy trained by GRPO can lose its answer format within a few steps (measured on the stand-in: the valid rate
fell from 0.98 to 0.66 in the last 20 of 800 steps), and the adapter saved at the end is then the broken one.
train_grpo.py therefore scores every checkpoint on the same VALIDATION_PROMPTS training prompts (same sampling
seeds each time; never the held-out split, which stays the final, untouched test), keeps the scores in
OUT/validation.json, and at the end makes the best-scoring checkpoint's adapter the run's adapter.

The score is the mean Boltzmann reward with invalid answers earning 0, so a collapse of the format shows in it.
Ties go to the later step.
"""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from output_files import strict_json, write_text_atomically
from training import run_directory
from training.evaluation import evaluate_model
from training.memory_plan import PhasePeaks

VALIDATION_FILE = "validation.json"  # in OUT: the score of every checkpoint, kept across --resume
COLLAPSE_DROP = 0.15  # a valid rate this far below the best seen so far is reported as a collapse


def pick_validation_rows(train_frames, pool, count, seed):
    """`count` rows of the training split (only prompts the stream can use), drawn once with `seed`."""
    usable = {record["prompt"] for record in pool}
    frame = pd.concat(list(train_frames.values()), ignore_index=True)
    frame = frame[frame["prompt"].isin(usable)].reset_index(drop=True)
    picks = np.random.default_rng(seed).choice(len(frame), size=min(count, len(frame)), replace=False)
    return frame.iloc[np.sort(picks)].reset_index(drop=True)


def choose_kept(history):
    """(kept entry, reason) from the scored checkpoints: the best score, the later step on a tie."""
    last = history[-1]
    kept = max(reversed(history), key=lambda entry: entry["score"])
    if kept["step"] == last["step"]:
        return kept, f"the last step scored best on the validation slice ({kept['score']:.3f})"
    return kept, (f"step {kept['step']} scored {kept['score']:.3f} on the validation slice (valid rate "
                  f"{kept['valid_rate']:.3f}), the last step {last['step']} {last['score']:.3f} (valid rate "
                  f"{last['valid_rate']:.3f})")


def describe_collapse(valid_rate, best_valid_rate):
    """' (valid rate collapsed from X)' when `valid_rate` fell COLLAPSE_DROP or more below the best, else ''."""
    if best_valid_rate is not None and valid_rate <= best_valid_rate - COLLAPSE_DROP:
        return f"  VALID RATE COLLAPSED (best so far {best_valid_rate:.3f})"
    return ""


def read_history(out, up_to_step=None):
    """Scores already in OUT/validation.json (those of steps <= up_to_step when resuming)."""
    path = Path(out) / VALIDATION_FILE
    if not path.is_file():
        return []
    history = json.loads(path.read_text())["checkpoints"]
    return [entry for entry in history if up_to_step is None or entry["step"] <= up_to_step]


def make_validation_callback(tokenizer, frame, settings, generator, out, history, log, batch_size=64,
                             memory_phases=None):
    """A TrainerCallback that scores each saved checkpoint on `frame` with the run's generation.Generator and writes
    OUT/validation.json; `batch_size` answers a pass (memory_plan.Plan.evaluation_rows on a GPU), its GPU memory
    the 'validation' phase of `memory_phases` (memory_plan.PhasePeaks)."""
    phases = memory_phases or PhasePeaks("cpu")

    class ValidationScorer(TrainerCallback):
        def __init__(self):
            self.history, self.frame, self.samples = list(history), frame, settings["VALIDATION_SAMPLES"]

        def on_save(self, args, state, control, model=None, **kwargs):
            if any(entry["step"] == state.global_step for entry in self.history):
                return  # a save of a step already scored (the Ctrl-C path saves again)
            start = time.time()
            # evaluate_model seeds torch for its own sampling; training continues with the random state it had, so
            # scoring changes nothing in the run (the completion log is the same with and without it)
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices), phases.phase("validation"):
                scores, _, _ = evaluate_model(model, tokenizer, frame, samples=self.samples,
                                              temperature=settings["TEMPERATURE"], top_p=settings["TOP_P"],
                                              max_new_tokens=settings["MAX_COMPLETION_LEN"], seed=settings["SEED"],
                                              batch_size=batch_size, generator=generator)
            entry = {"step": state.global_step, "score": scores["mean_reward"], "valid_rate": scores["valid_rate"],
                     "accuracy": scores["accuracy"], "seconds": round(time.time() - start, 1)}
            self.history.append(entry)
            write_text_atomically(strict_json({"prompts": len(frame), "samples": self.samples,
                                               "split": settings["TRAIN_SPLIT"], "checkpoints": self.history}),
                                  Path(out) / VALIDATION_FILE)
            best, _ = choose_kept(self.history)  # what would be kept if the run ended here
            standing = "best so far" if best is entry else f"best: step {best['step']}, {best['score']:.3f}"
            log(f"validation at step {state.global_step}: reward {entry['score']:.3f}  valid {entry['valid_rate']:.3f}"
                f"  ({standing}; {entry['seconds']:.0f} s)"
                + describe_collapse(entry["valid_rate"], max((e["valid_rate"] for e in self.history[:-1]),
                                                              default=None)))

    return ValidationScorer()


def load_checkpoint_adapter(model, checkpoint_dir):
    """Put the adapter weights of `checkpoint_dir` into the PEFT `model` in place (same adapter shape)."""
    weights = load_file(str(Path(checkpoint_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unmatched = [key for key in getattr(result, "unexpected_keys", []) if "lora" in key]
    if unmatched:
        raise RuntimeError(f"{checkpoint_dir}: adapter weights {', '.join(unmatched[:3])} fit no LoRA module of the "
                           "model being trained, so it holds another run's adapter; move it out of the run "
                           "directory (or train with --validation-prompts 0 to keep the last adapter)")


def keep_best_adapter(model, scorer, out, log):
    """Load the best-scoring checkpoint's adapter into the model when it is not the last step's; what was kept.

    Only checkpoints whose adapter files read (run_directory.checkpoint_problem) compete; the last step's adapter is
    the one in memory, so it always can."""

    last = scorer.history[-1]
    sound = []
    for entry in scorer.history:
        problem = None if entry is last else run_directory.checkpoint_problem(out / f"checkpoint-{entry['step']}",
                                                                              adapter_only=True)
        if problem:
            log(f"not keeping checkpoint-{entry['step']} whatever its score: {problem}")
        else:
            sound.append(entry)
    kept, reason = choose_kept(sound)
    if kept["step"] != last["step"]:
        load_checkpoint_adapter(model, out / f"checkpoint-{kept['step']}")
        log(f"kept the adapter of step {kept['step']}: {reason}; the last one stays in checkpoint-{last['step']}")
    return {"step": kept["step"], "reason": reason, "kept_scores": kept, "last_scores": last,
            "validation_prompts": len(scorer.frame), "validation_samples": scorer.samples}


def finish_if_done(out, step, total_steps, log, write=True):
    """For --resume of a run whose last checkpoint is `step`: False while steps remain. Else it says the run is
    finished, and a final adapter that was never saved (a kill during that save) is put in place from the checkpoint
    the run would have kept (choose_kept over its scored, complete checkpoints; the last one without
    scores), copied as the run saves it (by the process that may `write`: the main one); True."""
    if step < total_steps:
        return False
    out = Path(out)
    log(f"{out} is finished: its last checkpoint is step {step} of TOTAL_STEPS={total_steps}; nothing to train "
        "(to train it further, pass a larger --total-steps with --resume).")
    if not (out / "adapter_config.json").is_file() and write:
        kept, reason = kept_checkpoint(out, step)
        run_directory.install_adapter(out / f"checkpoint-{kept}", out / f"checkpoint-{step}", out)
        log(f"Its final adapter had not been saved: it is now, from checkpoint-{kept} ({reason}).")
    if not (out / "summary.json").is_file():
        log("It has no summary (the run was stopped before it wrote one); evaluate its adapter with: "
            f"python test_lora_adapter.py --adapter-path {out}")
    return True


def kept_checkpoint(out, last_step):
    """(step, why) of the checkpoint whose adapter a finished run keeps: the best-scoring complete one of
    validation.json (ties to the later step), else the last."""
    complete = {step for step, _ in run_directory.list_checkpoints(out)[0]}
    history = [entry for entry in read_history(out, last_step) if entry["step"] in complete]
    if not history:
        return last_step, "the last step; no checkpoint was scored"
    kept, reason = choose_kept(history)
    return kept["step"], reason
