"""GPU memory of each phase of a training run, measured beside what training/memory_plan.py plans for it, on one GPU.

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony      # the stand-in with the real tokenizer
    python benchmarks/measure_memory_plan.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out benchmarks/results/memory_plan.md

Each case is one `python train_grpo.py` process (its own CUDA context: its peaks are its own), STEPS steps of workload
W (4 prompts x 8 completions x 256 tokens) with the micro-batches and LoRA of CASES; the first case also scores a
checkpoint (validation) and evaluates held-out prompts, so that every phase is measured once. Each run's
summary.json holds every phase's peak as measured (torch's allocated memory) and as planned, and what the plan
counted (its parts). The table gives both, and below it the update's and the rollout's measured transient (the
peak beyond what the plan counts from the model's shape) fitted against the micro-batch's tokens by least squares:
memory_plan.UPDATE_GIB_PER_TOKEN, UPDATE_FIXED_GIB and ROLLOUT_TRANSIENT_GIB are set from these fits.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from output_files import write_text_atomically  # noqa: E402

# -----------------------------------------------------------------------------
STEPS = 3  # optimiser steps per case (the first compiles the engine's decode step)
EVERY_PHASE = ["--save-steps", "2", "--validation-prompts", "32", "--eval-samples", "1", "--eval-max-prompts", "64"]
CASES = {  # name -> train_grpo.py flags beyond the model, the steps and the output directory
    "attention LoRA, 16 x 2 (default)": ["--train-batch-size", "16", "--gradient-accumulation", "2", *EVERY_PHASE],
    "attention LoRA, 8 x 4": ["--train-batch-size", "8", "--gradient-accumulation", "4"],
    "expert LoRA, 8 x 4": ["--lora-experts", "true", "--train-batch-size", "8", "--gradient-accumulation", "4"],
    "expert LoRA, 16 x 2": ["--lora-experts", "true", "--train-batch-size", "16", "--gradient-accumulation", "2"],
    "TRL generate, 1 prompt, 1 x 8": ["--generation-backend", "generate", "--prompts-per-step", "1",
                                      "--train-batch-size", "1", "--gradient-accumulation", "8"],
}
CASE_TIMEOUT = 400  # seconds a case may run, model loading included
RUN_DIR = ROOT / "runs" / "measure-memory-plan"  # one directory per invocation, one run directory per case in it
# -----------------------------------------------------------------------------


def case_directory(invocation, name):
    return invocation / "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_case(name, flags, model_dir, invocation, extra_flags=()):
    """One training run; its summary.json, or {'failed': the log's last line}."""
    out = case_directory(invocation, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train_grpo.py"), "--model-id", str(model_dir), "--total-steps", str(STEPS),
               "--report-to", "none", "--validation-prompts", "0", "--eval-samples", "0", "--out", str(out), *flags,
               *extra_flags]
    with open(f"{out}.log", "w") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=CASE_TIMEOUT,
                                  env=dict(os.environ))
        except subprocess.TimeoutExpired:
            return {"failed": f"stopped after {CASE_TIMEOUT} s"}
    if done.returncode != 0:
        last = Path(f"{out}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"failed": last[0]}
    return json.loads((out / "summary.json").read_text())


def transients(summary):
    """(update tokens, measured update transient, measured rollout transient, expert LoRA?) of one run: each phase's
    measured peak less what the plan counts beside its transient."""
    parts, measured = summary["memory_plan"]["parts_gib"], summary["gpu_memory_gib"]
    base = parts["weights"] + parts["adapter"] + parts["engine_weights"]
    update = measured["update"] - base - parts["kept_cache"]
    rollout = measured["rollout"] - base - parts["rollout_cache"]
    return summary["memory_plan"]["update_tokens"], update, rollout


def fit_line(points):
    """Least-squares (intercept, slope) of [(x, y)]; the slope is 0 for a single x."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def render(results, card):
    phases = ("loading", "rollout", "update", "validation", "evaluation")
    lines = [f"# GPU memory by phase, measured and planned ({card})", "",
             "Command: `python benchmarks/measure_memory_plan.py`. GiB allocated (torch), measured / planned.", "",
             "| case | micro-batches | update tokens | " + " | ".join(phases) + " |",
             "|---|---|---|" + "---|" * len(phases)]
    fits = {}
    for name, summary in results.items():
        if "failed" in summary:
            lines.append(f"| {name} | failed: {summary['failed']} |" + " |" * (len(phases) + 1))
            continue
        measured, planned = summary["gpu_memory_gib"], summary["planned_gpu_memory_gib"]
        cells = [f"{measured[p]:.2f} / {planned[p]:.2f}" if p in measured and p in planned else
                 (f"{measured[p]:.2f}" if p in measured else "") for p in phases]
        plan = summary["memory_plan"]
        lines.append(f"| {name} | {plan['micro_batches'][0]} x {plan['micro_batches'][1]} | {plan['update_tokens']} | "
                     + " | ".join(cells) + " |")
        if summary.get("generation_backend") == "engine":
            tokens, update, rollout = transients(summary)
            group = "expert LoRA" if "expert" in name else "attention LoRA"
            fits.setdefault(group, []).append((tokens, update))
            fits.setdefault("rollout", []).append((0, rollout))
    lines += ["", "Transients beyond what the plan counts from the model's shape, fitted (least squares):", ""]
    for group, points in fits.items():
        intercept, slope = fit_line(points)
        if group == "rollout":
            lines.append(f"- rollout: {max(y for _, y in points):.2f} GiB at most over {len(points)} runs "
                         "(ROLLOUT_TRANSIENT_GIB)")
        else:
            lines.append(f"- update, {group}: {intercept:.2f} GiB + {slope * 1024:.3f} MiB a token "
                         f"({len(points)} runs; UPDATE_FIXED_GIB, UPDATE_GIB_PER_TOKEN)")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "stand-ins" / "gpt-oss-20b-shape"))
    parser.add_argument("--out", default=str(RUN_DIR / "memory_plan.md"), help="Markdown table (JSON beside it)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="which cases to run")
    args = parser.parse_args()
    invocation = RUN_DIR / time.strftime("%Y%m%d-%H%M%S")
    results, card = {}, "GPU"
    for name in args.cases:
        print(f"{name}: running {STEPS} steps", flush=True)
        results[name] = run_case(name, CASES[name], args.model_dir, invocation)
        card = results[name].get("device", card)
        print(json.dumps({"case": name, "measured": results[name].get("gpu_memory_gib"),
                          "planned": results[name].get("planned_gpu_memory_gib"),
                          "failed": results[name].get("failed")}), flush=True)
        table = render(results, card)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(table, Path(args.out))
        write_text_atomically(json.dumps(results, indent=2) + "\n", Path(args.out).with_suffix(".json"))
    print(table)


if __name__ == "__main__":
    main()
