"""Where a GRPO step's time goes: each part of the step and each kind of GPU kernel, from torch's profiler around
real steps of train_grpo.py, with the floor of the parts that are matmuls.

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony      # the stand-in with the real tokenizer
    python benchmarks/profile_grpo_step.py --model-dir runs/stand-ins/gpt-oss-20b-shape --out benchmarks/results/profile_grpo_step_h100.md
    python benchmarks/profile_grpo_step.py --tiny --out runs/profile-grpo-step/tiny.md     # a CPU: host time only

Runs train_grpo.main with its defaults (workload W on the 20b stand-in: 4 prompts x 8 completions x up to 256
tokens, LoRA r16 on attention, gradient checkpointing; no checkpoint scoring, no held-out evaluation) plus the
train_grpo.py flags given after `--`: WARM_STEPS steps unprofiled (compilation, CUDA graph capture, the allocator's
growth), then PROFILED_STEPS steps under torch.profiler. The parts are the ranges the trainer marks
(training/grpo_trainer.PROFILER_RANGES: generation, the log-probabilities for the loss and, where a run computes
them, without gradient (the reference model's with a KL term, the old policy's with several iterations a
generation), the rewards), the backward (autograd's functions, gradient checkpointing's recompute included) and the
optimiser's step; what runs outside them (TRL's loss arithmetic, zeroing the gradients, logging, the data) is
'the rest', and kernels the profiler links to no operation are 'unattributed kernels'. For each part: the GPU time of the kernels it launched and the host time it took, per step (the rest's
host time: the step's wall time less the parts'). The floor of
a forward is its matmul FLOPs (every layer's attention projections, router and the experts each token is routed to,
the LM head over the completion tokens) at the bf16 matmul rate measured here on one large matmul; the backward's is
two forwards (the recompute and the input gradients: the weights are frozen, the LoRA's gradients are small; it
counts the LM head twice, which has no recompute, and the attention's gradient once, which has two operands).

Writes a Markdown report (and its JSON beside it) of the parts, the kernel kinds and the slowest kernels; on a CPU
the kernel columns are empty. The run directory stays under runs/profile-grpo-step/<start time>/.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_grpo_step import invocation_directory  # noqa: E402  (benchmarks/ is the script's directory)
from output_files import write_text_atomically  # noqa: E402
# -----------------------------------------------------------------------------
WARM_STEPS = 3  # steps before the profiler starts
PROFILED_STEPS = 2  # steps under the profiler; the report gives means per step
RUN_DIR = ROOT / "runs" / "profile-grpo-step"  # one directory per invocation
KERNEL_KINDS = [  # (kind, regular expression on the kernel's name), first match wins
    ("MXFP4 dequantisation (Triton)", r"dequantize_kernel"),
    ("MXFP4 matmuls (Triton)", r"(dense|blocked|transposed)_matmul_kernel"),
    ("decode attention, expert combine (Triton)", r"decode_attention_kernel|combine_experts_kernel"),
    ("grouped matmuls (torch)", r"[Gg]roup(ed|Problem)"),
    ("attention (torch)", r"flash|fmha|[Aa]ttention"),
    ("matmuls (torch)", r"gemm|Gemm|nvjet|xmma|cutlass|sm90_|sm80_|matmul"),
    ("optimiser", r"multi_tensor|[Aa]dam"),
    ("copies, fills, casts", r"[Cc]opy|[Ff]ill|[Cc]ast|Memcpy|Memset|CatArray"),
    ("elementwise, reductions, indexing", r"elementwise|Elementwise|[Rr]educe|[Ss]oftmax|index|[Ss]catter|[Gg]ather|"
                                          r"triton_"),
    ("other", r""),
]
REST = "the rest"
UNATTRIBUTED = "unattributed kernels"
# -----------------------------------------------------------------------------


def part_of(name, ranges):
    """The step's part that a profiler event of this name is (None: not one by itself)."""
    for part, range_name in ranges.items():
        if name == range_name:
            return part
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward (with the recompute)"
    if name.startswith("Optimizer.step#"):
        return "optimiser"
    return None


def split_by_part(events, ranges):
    """{part: {"kernels": [(name, microseconds)], "host_us": float}} over the outermost event of each part; kernels
    launched outside every part go to REST, and device kernels linked to no operation to UNATTRIBUTED. A range's
    own span on the GPU (a user annotation, which the profiler links to its range as if it were a kernel) is left
    out."""
    annotations = {e.name for e in events if e.is_user_annotation} | set(ranges.values())
    parts = {}

    def add(part, kernels, host_us):
        entry = parts.setdefault(part, {"kernels": [], "host_us": 0.0})
        entry["kernels"] += [(k.name, k.duration) for k in kernels if k.name not in annotations]
        entry["host_us"] += host_us

    def kernels_under(event):
        found, stack = [], [event]
        while stack:
            e = stack.pop()
            found += e.kernels
            stack += e.cpu_children
        return found

    stack = [e for e in events if e.cpu_parent is None and not e.is_async and e.device_type.name == "CPU"]
    while stack:
        event = stack.pop()
        part = part_of(event.name, ranges)
        if part is not None:
            add(part, kernels_under(event), event.cpu_time_total)
        else:
            add(REST, event.kernels, 0.0)
            stack += event.cpu_children
    device = [e for e in events if e.device_type.name != "CPU" and not e.is_user_annotation]
    attributed = sum(d for entry in parts.values() for _, d in entry["kernels"])
    missing = sum(e.time_range.elapsed_us() for e in device) - attributed
    if missing > 0:
        parts[UNATTRIBUTED] = {"kernels": [("(kernels linked to no operation)", missing)], "host_us": 0.0}
    return parts


def kind_of(kernel_name):
    return next(kind for kind, pattern in KERNEL_KINDS if re.search(pattern, kernel_name))


def forward_flops(config, tokens, completion_tokens, rows):
    """Matmul FLOPs of one forward over `tokens` tokens in `rows` sequences, `completion_tokens` of which go through
    the LM head: every layer's attention projections, router and routed experts, and its attention scores and
    values (a token attends to half its sequence on average, at most the sliding window in sliding layers)."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = config.num_hidden_layers * (h * q + 2 * h * kv + q * h + h * config.num_local_experts
                                            + config.num_experts_per_tok * 3 * h * inter)
    half_sequence = tokens / max(1, rows) / 2
    attended = sum(min(half_sequence, config.sliding_window) if kind == "sliding_attention" else half_sequence
                   for kind in config.layer_types)
    return 2 * per_token * tokens + 4 * q * attended * tokens + 2 * config.vocab_size * h * completion_tokens


def matmul_flops_per_second():
    """bf16 FLOP/s of one large matmul on this GPU (the median of 10): the rate a forward's matmuls could reach."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 8192**3 / sorted(times[2:])[len(times[2:]) // 2]


def make_profiler_callback(first_step, last_step):
    """A TrainerCallback that profiles global steps first_step..last_step (from 1); once the run is over its
    `measured()` gives (events, step walls in seconds (the GPU synchronised at both ends), tokens scored, the mean
    completion length logged at each profiled step), or None if the run ended before."""
    import torch
    from transformers import TrainerCallback

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.profiler, self.walls, self.started, self.tokens_before = None, [], None, 0
            self.completion_lengths, self.events, self.tokens = [], None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if first_step <= state.global_step + 1 <= last_step:
                synchronize()
                if self.profiler is None:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    self.profiler = torch.profiler.profile(activities=activities)
                    self.profiler.start()
                    self.tokens_before = state.num_input_tokens_seen
                self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # after on_step_end of the step it logs
            if first_step <= state.global_step <= last_step and logs and "completions/mean_length" in logs:
                self.completion_lengths.append(logs["completions/mean_length"])

        def on_step_end(self, args, state, control, **kwargs):
            if first_step <= state.global_step <= last_step:
                synchronize()
                self.walls.append(time.perf_counter() - self.started)
                if state.global_step == last_step:
                    self.profiler.stop()
                    self.tokens = state.num_input_tokens_seen - self.tokens_before
                    self.events = self.profiler.events()

        def measured(self):
            if self.events is None:
                return None
            return self.events, self.walls, self.tokens, self.completion_lengths

    return StepProfiler()


def summarise(events, walls, tokens, completion_lengths, completions_per_step, config, flops_per_second):
    """The report's numbers (per step): parts, kernel kinds, slowest kernels, floors."""
    from training.grpo_trainer import PROFILER_RANGES

    steps = len(walls)
    parts = split_by_part(events, PROFILER_RANGES)
    all_kernels = [k for entry in parts.values() for k in entry["kernels"]]
    busy_ms = sum(d for _, d in all_kernels) / 1e3 / steps
    tokens_per_step = tokens / steps
    completion_tokens = (sum(completion_lengths) / len(completion_lengths) * completions_per_step
                         if completion_lengths else 0.0)
    forward_ms = (1e3 * forward_flops(config, tokens_per_step, completion_tokens, completions_per_step)
                  / flops_per_second if flops_per_second else None)
    floors = {"log-probabilities without gradient": forward_ms, "log-probabilities for the loss": forward_ms,
              "backward (with the recompute)": 2 * forward_ms if forward_ms else None}
    wall_ms = 1e3 * sum(walls) / steps
    parts.setdefault(REST, {"kernels": [], "host_us": 0.0})["host_us"] = 1e3 * steps * max(
        0.0, wall_ms - sum(entry["host_us"] / 1e3 / steps for part, entry in parts.items() if part != REST))
    def ms_per_step_by(kernels, key):
        """{key(kernel name): ms a step}, largest first."""
        totals = {}
        for name, duration in kernels:
            totals[key(name)] = totals.get(key(name), 0.0) + duration / 1e3 / steps
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    rows = []
    for part, entry in parts.items():
        gpu_ms = sum(d for _, d in entry["kernels"]) / 1e3 / steps
        floor = floors.get(part)
        rows.append({"part": part, "gpu_ms": gpu_ms, "host_ms": entry["host_us"] / 1e3 / steps,
                     "floor_ms": floor, "gpu_over_floor": gpu_ms / floor if floor else None,
                     "kinds_ms": ms_per_step_by(entry["kernels"], kind_of)})
    rows.sort(key=lambda row: (-row["gpu_ms"], -row["host_ms"]))
    return {"steps": steps, "wall_ms": wall_ms, "gpu_busy_ms": busy_ms,
            "tokens_per_step": tokens_per_step, "completion_tokens_per_step": completion_tokens,
            "matmul_tflops": flops_per_second / 1e12 if flops_per_second else None, "parts": rows,
            "kinds_ms": ms_per_step_by(all_kernels, kind_of),
            "slowest_kernels_ms": dict(list(ms_per_step_by(all_kernels, lambda name: name).items())[:15])}


def render(result, command):
    def ms(value):
        return "" if value is None else f"{value:,.1f}"

    lines = [f"# Where a GRPO step's time goes ({result['card']})", "",
             f"Command: `{command}`. Means over {result['steps']} profiled steps after {result['warm_steps']} "
             f"unprofiled ones; {result['tokens_per_step']:,.0f} tokens a step scored "
             f"({result['completion_tokens_per_step']:,.0f} of them completions).", "",
             f"A step: {ms(result['wall_ms'])} ms of wall time, the GPU busy {ms(result['gpu_busy_ms'])} ms of it"
             + (f"; bf16 matmuls run at {result['matmul_tflops']:.0f} TFLOP/s here (one 8192^3 matmul), the floors' "
                "rate." if result["matmul_tflops"] else " (no GPU: host times only)."), "",
             "| part of the step | GPU kernels ms | host ms | floor ms | GPU / floor | largest kinds of kernel (ms) |",
             "|---|---|---|---|---|---|"]
    for row in result["parts"]:
        kinds = ", ".join(f"{kind} {value:,.1f}" for kind, value in list(row["kinds_ms"].items())[:3])
        ratio = f"{row['gpu_over_floor']:.1f}x" if row["gpu_over_floor"] else ""
        lines.append(f"| {row['part']} | {ms(row['gpu_ms'])} | {ms(row['host_ms'])} | {ms(row['floor_ms'])} | "
                     f"{ratio} | {kinds} |")
    lines += ["", "| kind of kernel | ms a step |", "|---|---|"]
    lines += [f"| {kind} | {value:,.1f} |" for kind, value in result["kinds_ms"].items()]
    lines += ["", "| slowest kernels | ms a step |", "|---|---|"]
    lines += [f"| `{name[:100]}` | {value:,.1f} |" for name, value in result["slowest_kernels_ms"].items()]
    return "\n".join(lines) + "\n"


def portable(path):
    """A path as a report may show it: relative to the repository when it lies inside, else its name."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "stand-ins" / "gpt-oss-20b-shape"))
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-in (a CPU's smoke run: host times only)")
    parser.add_argument("--out", required=True, help="the Markdown report (its JSON beside it)")
    parser.add_argument("--warm-steps", type=int, default=WARM_STEPS)
    parser.add_argument("--profiled-steps", type=int, default=PROFILED_STEPS)
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="where the run's directory is made")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: more train_grpo.py flags")
    args = parser.parse_args(argv)
    if args.warm_steps < 1 or args.profiled_steps < 1:
        parser.error("--warm-steps and --profiled-steps must be at least 1")
    extra = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    model = ["--tiny"] if args.tiny else ["--model-id", args.model_dir]
    if not args.tiny and not (Path(args.model_dir) / "config.json").is_file():
        sys.exit(f"error: --model-dir {args.model_dir}: no model there; build the 20b stand-in with "
                 "`python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony`, or pass --tiny")
    run = invocation_directory(time.time(), args.run_dir)
    total = args.warm_steps + args.profiled_steps
    flags = [*model, "--total-steps", str(total), "--save-steps", str(10 * total), "--validation-prompts", "0",
             "--eval-samples", "0", "--report-to", "none", "--out", str(run / "run"), *extra]
    print(f"profiling steps {args.warm_steps + 1}-{total} of `train_grpo.py {' '.join(flags)}`", flush=True)

    import torch
    from transformers import AutoConfig

    import tiny_gpt_oss
    import train_grpo

    callback = make_profiler_callback(args.warm_steps + 1, total)
    train_grpo.main(flags, callbacks=[callback])
    if callback.measured() is None:
        sys.exit("error: the run ended before its profiled steps (its output above says why)")
    settings = json.loads((run / "run" / "run_config.json").read_text())
    config = AutoConfig.from_pretrained(tiny_gpt_oss.TINY_DIR if args.tiny else args.model_dir)
    completions = settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    flops = matmul_flops_per_second() if torch.cuda.is_available() else None
    result = summarise(*callback.measured(), completions, config, flops)
    result |= {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
               "warm_steps": args.warm_steps,
               "run": portable(run)}
    shown = ["--tiny"] if args.tiny else ["--model-dir", portable(args.model_dir)]
    shown += [f"--warm-steps {args.warm_steps}", f"--profiled-steps {args.profiled_steps}"]
    command = " ".join(["python benchmarks/profile_grpo_step.py", *shown] + (["--", *extra] if extra else []))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(json.dumps(result, indent=1) + "\n", out.with_suffix(".json"))
    write_text_atomically(render(result, command), out)
    print(render(result, command))


if __name__ == "__main__":
    main()
