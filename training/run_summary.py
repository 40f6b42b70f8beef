"""What a training run reports: the progress line, the speed and learning summaries, summary.md and summary.json.

    train_grpo.py builds its trainer with make_progress_printer(...) and ends with write_summary(out, summary)

Pure functions of the trainer's log history and the run's settings; heavy libraries are imported where needed.
"""

import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from output_files import strict_json, write_text_atomically
from training import best_checkpoint
from training.rewards import reward_metric

ROOT = Path(__file__).resolve().parents[1]

def mean_of(logs, key):
    """Mean of `key` over trainer log rows that hold a number for it (NaN and None left out); None if none do."""
    values = [log[key] for log in logs if isinstance(log.get(key), (int, float)) and not math.isnan(log[key])]
    return sum(values) / len(values) if values else None


def make_progress_printer(total_steps, every):
    """A TrainerCallback that prints one compact line every `every` steps (the full metrics go to TensorBoard), in the
    main process."""
    class ProgressPrinter(TrainerCallback):
        def __init__(self):
            self.start, self.window, self.best_valid = None, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return  # one progress line per step however many processes train (their metrics are averaged)
            if logs and "reward" in logs:
                self.window.append(logs)
            if state.global_step % every and state.global_step != total_steps or not self.window:
                return
            def mean(key):
                value = mean_of(self.window, key)
                return float("nan") if value is None else value

            def shown(value):  # a window in which every answer was invalid has no action reward
                return "  n/a" if math.isnan(value) else f"{value:.3f}"

            done = state.global_step - self.first_step
            per_step = (time.time() - self.start) / max(done, 1)
            valid = mean("valid_rate")
            print(f"step {state.global_step:5d}/{total_steps}  reward {shown(mean(reward_metric()))}  "
                  f"valid {shown(valid)}  accuracy {shown(mean('accuracy'))}  "
                  f"{per_step:.2f} s/step  eta {per_step * (total_steps - state.global_step) / 60:.1f} min"
                  + best_checkpoint.describe_collapse(valid, self.best_valid), flush=True)
            if not math.isnan(valid):
                self.best_valid = max(valid, self.best_valid or 0.0)
            self.window = []

    return ProgressPrinter()


def summarize_speed(log_history, device, first_step=0, completions_per_step=None, peak_gib=None):
    """Seconds per step (generation and the rest), generated tokens per second, completions per second, peak GPU
    memory (of the fullest card; every card's too when there are several): this process's `peak_gib` (the largest
    phase of memory_plan.PhasePeaks), or torch's peak counter when none is given.

    Only steps after `first_step` count: a resumed run's history holds the steps of earlier starts too. With several
    processes the generation figures are one process's (TRL averages them over the processes), and every process
    must call this (the peaks are gathered).
    """
    rows = [r for r in log_history if "step_time" in r and r.get("step", 0) > first_step]
    step, generation, tokens = (mean_of(rows, key) for key in
                                ("step_time", "timing/generation_seconds", "timing/generated_tokens"))
    speed = {"seconds_per_step": step, "generation_seconds_per_step": generation,
             "update_seconds_per_step": step - generation if step is not None and generation is not None else None,
             "generated_tokens_per_second": tokens / generation if tokens and generation else None,
             "completions_per_second": completions_per_step / step if completions_per_step and step else None}
    if device == "cuda":
        peak = peak_gib if peak_gib is not None else torch.cuda.max_memory_allocated() / 2**30
        peaks = gather_object([peak])  # one per process, in process order
        speed["peak_gpu_memory_gib"] = max(peaks)
        if len(peaks) > 1:
            speed["peak_gpu_memory_gib_per_process"] = peaks
    return speed


def summarize_log(log_history):
    """Reward, valid rate and accuracy at the start and end of training, from the trainer's log history."""
    rows = [r for r in log_history if reward_metric() in r or "train/valid_rate" in r]
    def window(part):
        keys = {"reward": reward_metric(), "valid_rate": "valid_rate", "accuracy": "accuracy"}
        return {label: mean_of(part, key) for label, key in keys.items()}
    k = max(1, min(10, len(rows) // 5))
    return {"steps": len(rows), "first_steps": window(rows[:k]), "last_steps": window(rows[-k:]), "window": k}


def write_summary(out, summary):
    """summary.json for programs, summary.md for people."""
    write_text_atomically(strict_json(summary), Path(out) / "summary.json")
    write_text_atomically(render_summary(summary), Path(out) / "summary.md")


def render_summary(summary):
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    t = summary["training"]
    out = Path(summary["out"])
    done, ran = summary["steps_done"], summary.get("steps_this_process", summary["steps_done"])
    if ran == done:
        steps = f"{done} steps in {summary['train_seconds']:.0f} s on {summary['device']}"
    else:
        steps = (f"{done} steps; this launch continued from {summary['resumed_from']} and ran steps "
                 f"{done - ran + 1}-{done} ({ran} steps) in {summary['train_seconds']:.0f} s on {summary['device']}")
    experts = f", experts: {summary['experts_format']}" if summary.get("experts_format") else ""
    steps += f" (generation: {summary.get('generation_backend', 'n/a')}{experts})."
    if "processes" in summary:
        processes, prompts = summary["processes"], summary["prompts_per_step"]
        steps += f" {describe_batch(processes, prompts // processes, summary['completions_per_step'] // prompts)}."
    memory = summary.get("gpu_memory_gib")
    if memory:
        planned = summary.get("planned_gpu_memory_gib") or {}
        steps += (" Peak GPU memory allocated, by phase (planned in brackets): " + ", ".join(
            f"{phase} {gib:.1f}" + (f" ({planned[phase]:.1f})" if phase in planned else "") + " GiB"
            for phase, gib in memory.items()) + ".")
    kept = summary.get("kept")
    if kept:
        steps += (f" Adapter kept: step {kept['step']} of {done}, by its score on {kept['validation_prompts']} "
                  f"training prompts x {kept['validation_samples']} answers: {kept['reason']}.")
    lines = [f"# GRPO run {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", "", steps, "",
             render_speed(summary["speed"], summary.get("processes", 1)), "",
             "| during training | reward | valid rate | accuracy |", "|---|---|---|---|"]
    for label, key in (("first steps", "first_steps"), ("last steps", "last_steps")):
        w = t[key]
        lines.append(f"| {label} ({t['window']}) | {fmt(w['reward'])} | {fmt(w['valid_rate'])} | "
                     f"{fmt(w['accuracy'])} |")
    if summary.get("held_out"):
        h = summary["held_out"]
        lines += ["", f"Held-out split: {h['prompts']} prompts x {h['samples']} answers at temperature "
                  f"{h['temperature']} (invalid answers earn 0).", "",
                  "| policy | mean reward | valid rate | accuracy | mean regret |", "|---|---|---|---|---|"]
        for name in ("untrained", "trained"):
            m = h[name]
            lines.append(f"| {name} | {fmt(m['mean_reward'])} | {fmt(m['valid_rate'])} | {fmt(m['accuracy'])} | "
                         f"{fmt(m['mean_regret'])} |")
        r = h["references"]
        lines.append(f"| uniform guessing | {fmt(r['uniform']['mean_reward'])} | 1.000 | "
                     f"{fmt(r['uniform']['accuracy'])} | {fmt(r['uniform']['mean_regret'])} |")
        lines.append(f"| best constant [{r['best_constant']['action']}] | {fmt(r['best_constant']['mean_reward'])} | "
                     f"1.000 | {fmt(r['best_constant']['accuracy'])} | {fmt(r['best_constant']['mean_regret'])} |")
        lines.append(f"| optimal (argmax Q) | {fmt(r['optimal']['mean_reward'])} | 1.000 | 1.000 | 0.000 |")
        g = h["gain"]
        lines += ["", f"Gain over the untrained policy: {g['mean']:+.3f} mean reward (95% interval "
                  f"{g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}, paired bootstrap over the {g['prompts']} prompts)."]
    elif summary.get("held_out_interrupted"):
        lines += ["", "The held-out evaluation was interrupted (Ctrl-C); the adapter is saved. Evaluate it with: "
                  f"python test_lora_adapter.py --adapter-path {out}"]
    return "\n".join(lines) + "\n"


def render_speed(speed, processes=1):
    def fmt(x, unit):
        return "n/a" if x is None else f"{x:.2f} {unit}"
    line = (f"Per step: {fmt(speed['seconds_per_step'], 's')} ({fmt(speed['generation_seconds_per_step'], 's')} "
            f"generation, {fmt(speed['update_seconds_per_step'], 's')} the rest); "
            f"{fmt(speed['generated_tokens_per_second'], 'generated tokens/s')}"
            + (" per process" if processes > 1 else ""))
    if speed.get("completions_per_second") is not None:
        line += f"; {fmt(speed['completions_per_second'], 'completions/s')}"
        if processes > 1:
            line += " (all processes)"
    if "peak_gpu_memory_gib_per_process" in speed:
        line += "; peak GPU memory per card " + ", ".join(f"{gib:.1f}" for gib in
                                                           speed["peak_gpu_memory_gib_per_process"]) + " GiB"
    elif "peak_gpu_memory_gib" in speed:
        line += f"; peak GPU memory {speed['peak_gpu_memory_gib']:.1f} GiB"
    return line + "."


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def describe_batch(processes, prompts_per_step, generations):
    """'2 processes x 4 prompts x 8 answers = 64 completions per step': PROMPTS_PER_STEP counts per process."""
    return (f"{processes} process{'es' if processes > 1 else ''} x {prompts_per_step} prompts x {generations} answers "
            f"= {processes * prompts_per_step * generations} completions per step")
