"""GRPO seconds per step for each generation back end, side by side, in one invocation on one GPU.

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony      # the stand-in with the real tokenizer
    python benchmarks/bench_grpo_step.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out benchmarks/results/grpo_step.md

Workload W is train_grpo.py's defaults: 4 prompts x 8 completions x up to 256 tokens, LoRA r16 on attention,
gradient checkpointing, the model directory's tokenizer (the real one gives 242-273-token prompts). Each row is one
`python train_grpo.py` process (its own CUDA context, so its peak memory is its own), 1 warm-up step and then the
measured steps; the default row runs DEFAULT_STEPS steps with no flag but the model, to show the defaults hold (on a
GPU the experts stay MXFP4: train_grpo.py's EXPERTS_FORMAT 'auto'), and so do the two rows that name the experts'
format alone (`--experts-format mxfp4`, `--experts-format bf16`), and the default run with GPT_OSS_GPU_CAPABILITY=8.0:
what an A100 or an RTX 3090 / 4090 executes (no 'transposed' kernel, no TMA, grouped matmuls as a loop over the
experts; mxfp4_experts.gpu_capability), here on a Hopper card. The two 'fused grouped matmul' rows run the training
forward and backward's expert matmuls as one Triton kernel each (GPT_OSS_GROUPED_MATMUL=fused, on the Hopper path and
on the forced Ampere one: the forced rows take an Ampere card's choices, but Triton still builds for the card at hand,
so what an A100 compiles is checked only by tests/test_kernel_targets.py); the 'shared prompts' rows score each micro-batch packed, each shared prompt once
(GPT_OSS_SHARED_PROMPTS=1, training/packed_scoring.py). `--max-gpu-memory-gib 23` runs every row under a
23 GiB cap (torch.cuda.set_per_process_memory_fraction): what fits a 24 GB card is shown, not assumed.
The stand-in's random weights never write a stop token, so every completion runs the full 256 tokens.

Writes a Markdown table (s/step, generation s, update s, generated tokens/s, peak GiB, card) and a JSON beside it,
and exits with status 1 when a row failed (its run's log says why); bad arguments are refused before any row runs;
each row's run directory and log stay under runs/bench-grpo-step/<when the invocation started>/, so that running
the benchmark again never meets the previous invocation's runs.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from output_files import write_text_atomically  # noqa: E402
# -----------------------------------------------------------------------------
MEASURED_STEPS = 3  # steps timed after the warm-up step, per back end
DEFAULT_STEPS = 20  # steps of the run with default settings (the first is the warm-up)
DEFAULT_ROW = "engine (default)"
MXFP4_ROW = "engine, MXFP4 experts"
BF16_ROW = "engine, bf16 experts"
SM80_ROW = "engine, an Ampere card's path (forced)"
FUSED_ROW = "engine, fused grouped matmul"
FUSED_SM80_ROW = "engine, an Ampere card's path (forced), fused grouped matmul"
SHARED_ROW = "engine, shared prompts"
SHARED_FUSED_ROW = "engine, shared prompts, fused grouped matmul"
GROWTH_ROWS = {32: DEFAULT_ROW, 64: "engine, 64 completions a step", 128: "engine, 128 completions a step"}  # W's
                                                                  #   step, then 2x and 4x its prompts (same micro-batch)
ROWS = {  # name -> (extra train_grpo.py flags, steps incl. warm-up or None for MEASURED_STEPS + 1); rows that name no
          #   experts format take the default ('auto': MXFP4 on a GPU)
    DEFAULT_ROW: ([], DEFAULT_STEPS),
    MXFP4_ROW: (["--experts-format", "mxfp4"], DEFAULT_STEPS),
    BF16_ROW: (["--experts-format", "bf16"], DEFAULT_STEPS),
    SM80_ROW: ([], DEFAULT_STEPS),
    "engine, MXFP4 experts + expert LoRA": (["--experts-format", "mxfp4", "--lora-experts", "true"], None),
    "engine, bf16 experts + expert LoRA": (["--experts-format", "bf16", "--lora-experts", "true"], None),
    FUSED_ROW: ([], None),
    FUSED_SM80_ROW: ([], None),
    SHARED_ROW: ([], None),
    SHARED_FUSED_ROW: ([], None),
    "generate": (["--generation-backend", "generate"], None),
    "continuous-batching": (["--generation-backend", "continuous-batching"], None),
    GROWTH_ROWS[64]: (["--prompts-per-step", "8", "--gradient-accumulation", "4"], None),
    GROWTH_ROWS[128]: (["--prompts-per-step", "16", "--gradient-accumulation", "8"], None),
    "engine, micro-batches of 16": (["--train-batch-size", "16", "--gradient-accumulation", "2"], None),
    "engine, one micro-batch of 32": (["--train-batch-size", "32", "--gradient-accumulation", "1"], None),
}
FORCED_SM80 = {"GPT_OSS_GPU_CAPABILITY": "8.0"}  # the code an A100 / RTX 3090 runs: no 'transposed' kernel, no TMA,
                                                #   grouped matmuls as a loop over the experts (gpu_engine/mxfp4_experts.py)
FUSED = {"GPT_OSS_GROUPED_MATMUL": "fused"}  # the many-rows expert matmuls as one Triton kernel each, no bf16 copy of a
                                            #   layer's matrix (mxfp4_experts.GROUPED_MATMUL)
SHARED = {"GPT_OSS_SHARED_PROMPTS": "1"}  # each micro-batch's rows packed, each shared prompt run once
                                        #   (training/packed_scoring.SHARED_PROMPTS)
ROW_ENVIRONMENT = {  # name -> variables set for that row's process
    SM80_ROW: FORCED_SM80,
    FUSED_ROW: FUSED,
    FUSED_SM80_ROW: {**FORCED_SM80, **FUSED},
    SHARED_ROW: SHARED,
    SHARED_FUSED_ROW: {**SHARED, **FUSED},
}
FULL_ROWS = (DEFAULT_ROW, MXFP4_ROW, BF16_ROW, SM80_ROW)  # rows that keep the defaults' checkpoints and scoring
ROW_TIMEOUT = 420  # seconds a row may run (model loading included) before it is stopped and reported as such
RUN_DIR = ROOT / "runs" / "bench-grpo-step"  # one directory per invocation, in it one run directory per row
# -----------------------------------------------------------------------------


def row_directory(invocation, name):
    """The run directory of row `name` in the invocation's directory: the row's name made a path."""
    return invocation / name.replace(" ", "-").replace("(", "").replace(")", "").replace("+", "plus").replace(",", "")


def invocation_directory(started, runs=None):
    """`runs` (None: RUN_DIR)/<start time, to the second>; a later invocation in the same second gets a numbered
    sibling."""
    base = Path(runs or RUN_DIR) / time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path, count = base, 1
    while path.exists():
        count += 1
        path = base.with_name(f"{base.name}-{count}")
    return path


def run_row(name, flags, steps, model_dir, log, invocation, timeout=ROW_TIMEOUT, max_gpu_memory_gib=0):
    out = row_directory(invocation, name)
    command = [sys.executable, str(ROOT / "train_grpo.py"), "--model-id", str(model_dir), "--total-steps", str(steps),
               "--report-to", "none", "--eval-samples", "0", "--out", str(out), *flags]
    if max_gpu_memory_gib:
        command += ["--max-gpu-memory-gib", str(max_gpu_memory_gib)]
    if name not in FULL_ROWS:  # the other rows time steps only: no checkpoint, no scoring
        command += ["--save-steps", str(10 * steps), "--validation-prompts", "0"]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(f"{out}.log", "w") as log_file:
        try:
            done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, **ROW_ENVIRONMENT.get(name, {})})
        except subprocess.TimeoutExpired:
            message = f"stopped after {timeout} s before its {steps} steps ended"
            log(f"{name}: {message}")
            return {"backend": name, "failed": message, "steps": steps, "max_gpu_memory_gib": max_gpu_memory_gib}
    wall = time.time() - start
    if done.returncode != 0:
        last = Path(f"{out}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        log(f"{name}: FAILED after {wall:.0f} s: {last[0]}")
        return {"backend": name, "failed": last[0], "steps": steps, "max_gpu_memory_gib": max_gpu_memory_gib}
    return {**measure(name, out, steps, wall), "max_gpu_memory_gib": max_gpu_memory_gib}


def engine_fallbacks(log_text):
    """The rollout engine's own lines saying it went on without its compiled code or Triton kernels
    (decode_step.DecodeKernels.run_or_fall_back): such a row's generation ran the slow plain path."""
    return [line.strip() for line in log_text.splitlines() if line.startswith("rollout engine: ") and " failed" in line]


def measure(name, out, steps, wall):
    """Means over the steps after the first, from the trainer's log history; peak memory from the run's summary;
    whether the engine fell back (from the row's log)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rows = [r for r in history if "step_time" in r][1:]
    summary = json.loads((out / "summary.json").read_text())
    validation = out / "validation.json"
    scored = json.loads(validation.read_text())["checkpoints"] if validation.is_file() else []

    def mean(key):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else math.nan

    step, generation, tokens = mean("step_time"), mean("timing/generation_seconds"), mean("timing/generated_tokens")
    return {"backend": name, "steps": steps, "measured_steps": len(rows), "seconds_per_step": step,
            "generation_seconds": generation, "update_seconds": step - generation,
            "generated_tokens_per_second": tokens / generation,
            "completions_per_step": summary.get("completions_per_step") or tokens / 256,
            "peak_gib": summary["speed"].get("peak_gpu_memory_gib"), "card": summary["device"],
            "wall_seconds": wall, "generation_backend": summary.get("generation_backend"),
            "experts_format": summary.get("experts_format"),
            "validation_seconds": [entry["seconds"] for entry in scored],
            "engine_fell_back": engine_fallbacks(log.read_text()) if (log := Path(f"{out}.log")).is_file() else []}


def render(results, model_dir, tokenizer):
    model_dir = Path(model_dir).resolve()
    if model_dir.is_relative_to(ROOT):
        model_dir = model_dir.relative_to(ROOT)  # no machine's path in a table meant to be committed
    cap = results[0].get("max_gpu_memory_gib")
    lines = [f"# GRPO step by generation back end ({results[0].get('card', 'GPU')})", "",
             f"Model: {model_dir} (tokenizer: {tokenizer}). Command: `python benchmarks/bench_grpo_step.py`"
             + (f" `--max-gpu-memory-gib {cap:g}` (every row capped at {cap:g} GiB, as on a smaller card)." if cap
                else "."), "",
             "| back end | experts | steps (measured) | s / step | generation s | update s | generated tokens / s | "
             "completions / s | peak GiB | card |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['backend']} | | {r['steps']} | failed: {r['failed']} | | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r.get('experts_format') or 'n/a'} | {r['steps']} ({r['measured_steps']}) | "
                     f"{r['seconds_per_step']:.2f} | "
                     f"{r['generation_seconds']:.2f} | {r['update_seconds']:.2f} | "
                     f"{r['generated_tokens_per_second']:.0f} | {completions_per_second(r):.1f} | "
                     f"{r['peak_gib']:.1f} | {r['card']} |")
    fell_back = [(r["backend"], r["engine_fell_back"][0]) for r in results if r.get("engine_fell_back")]
    if fell_back:
        lines += [""] + [f"**{name}: not the engine's fast path.** Its log says: `{line}`" for name, line in fell_back]
    by_name = {r["backend"]: r for r in results if "failed" not in r}
    if "generate" in by_name and DEFAULT_ROW in by_name:
        ratio = by_name["generate"]["seconds_per_step"] / by_name[DEFAULT_ROW]["seconds_per_step"]
        lines += ["", f"Engine vs TRL's generate in this run: {ratio:.1f}x faster per step."]
    growth = [(n, completions_per_second(by_name[name])) for n, name in GROWTH_ROWS.items() if name in by_name]
    if len(growth) > 1:
        lines += ["", "Completions a second by completions a step (the same micro-batch of "
                  "16): " + ", ".join(f"{n}: {rate:.1f}" for n, rate in growth) + "."]
    return "\n".join(lines) + "\n"


def completions_per_second(row):
    """A measured row's whole GRPO step rate in completions: what a larger step should raise."""
    return row["completions_per_step"] / row["seconds_per_step"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "stand-ins" / "gpt-oss-20b-shape"))
    parser.add_argument("--out", default=str(RUN_DIR / "grpo_step.md"), help="Markdown table (JSON beside it)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which rows to run")
    parser.add_argument("--row-timeout", type=int, default=ROW_TIMEOUT, help="seconds a row may run")
    parser.add_argument("--max-gpu-memory-gib", type=float, default=0,
                        help="cap every row's GPU memory at this many GiB (train_grpo.py's MAX_GPU_MEMORY_GIB), e.g. "
                             "23 to show that a row fits a 24 GB card")
    args = parser.parse_args()
    problem = check_arguments(args)
    if problem:
        parser.error(problem)
    recipe = Path(args.model_dir) / "recipe.json"
    tokenizer = json.loads(recipe.read_text()).get("tokenizer", "unknown") if recipe.is_file() else "unknown"
    results, invocation = [], invocation_directory(time.time())
    print(f"runs of this invocation: {invocation}", flush=True)
    for name in args.rows:
        flags, steps = ROWS[name]
        print(f"{name}: running {steps or MEASURED_STEPS + 1} steps", flush=True)
        results.append(run_row(name, flags, steps or MEASURED_STEPS + 1, args.model_dir, print, invocation,
                               args.row_timeout, args.max_gpu_memory_gib))
        print(json.dumps(results[-1]), flush=True)
        table = render(results, args.model_dir, tokenizer)  # after every row: a stopped run keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(table, Path(args.out))
        write_text_atomically(json.dumps(results, indent=2) + "\n", Path(args.out).with_suffix(".json"))
    print(table)
    failed = [r["backend"] for r in results if "failed" in r]
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(results)} rows failed ({', '.join(failed)}); their logs are "
                         f"beside their run directories under {invocation}")


def check_arguments(args):
    """Why the arguments cannot make a benchmark (one line naming the flag), or None: checked before any row runs."""
    from output_files import why_not_writable

    if not (Path(args.model_dir) / "config.json").is_file():
        return (f"--model-dir {args.model_dir}: no model directory there (no config.json); build the stand-in with "
                "python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony")
    if not (math.isfinite(args.max_gpu_memory_gib) and args.max_gpu_memory_gib >= 0):
        return f"--max-gpu-memory-gib must be 0 (no cap) or a number of GiB, got {args.max_gpu_memory_gib}"
    if args.row_timeout <= 0:
        return f"--row-timeout must be a number of seconds above 0, got {args.row_timeout}"
    return why_not_writable(Path(args.out))


if __name__ == "__main__":
    main()
