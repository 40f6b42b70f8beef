"""The GPU memory of a training run, planned before the model loads and measured while it runs, phase by phase.

    plan = memory_plan.plan_run(config, "mxfp4", settings, prompt_lengths)    # train_grpo.py, before loading
    plan.peaks_gib()       # {"rollout": .., "update": .., "validation": .., "evaluation": ..}: GiB allocated
    memory_plan.fit_to_card(config, "mxfp4", settings, prompt_lengths, usable_gib, fixed)  # what fits, or why not
    phases = memory_plan.PhasePeaks("cuda")       # the run's measured peak of each phase, for summary.json
    with phases.phase("validation"): ...

A run on one card passes through phases that hold different things at once:
- kept for the whole run: the weights (model_loader.weight_bytes), the adapter with its AdamW state (an fp32 weight,
  its gradient and two moments: 16 bytes a trainable value), and what the rollout engine keeps between steps: its
  copies of the attention weights (q/k/v and o stacked with the LoRA's A rows, bf16), the MXFP4 experts' scales laid
  out for the decode kernel, and its static KV cache (one, of the longest length met, where its attention kernel
  runs; else one per recent cache size, up to MAX_CACHED_GRAPHS);
- rollout: the engine's prefill beside that, which dequantises one layer's expert matrix to bf16 at a time;
- update: one micro-batch's forward, recompute and backward: a part per token of the micro-batch (TRAIN_BATCH_SIZE
  rows of the longest prompt plus MAX_COMPLETION_LEN), larger with an expert LoRA and far larger without gradient
  checkpointing, and a fixed part (a dequantised expert matrix, the LM head's chunk);
- validation (at every checkpoint) and the held-out evaluation: the engine first lets go of training's caches
  (rollout_engine.RolloutEngine.release), then samples in passes of `evaluation_rows` rows, the most that fit.
The per-token and fixed parts of the update, and the rollout's transient, are measured figures
(UPDATE_GIB_PER_TOKEN, UPDATE_FIXED_GIB, ROLLOUT_TRANSIENT_GIB: `python benchmarks/measure_memory_plan.py` on an
H100, benchmarks/RESULTS.md), and TRL's generate's transient (GENERATE_TRANSIENT_GIB) a lower bound from a run that
did not fit; everything else is counted from the model's shape. Figures are torch's allocated
memory; a card also holds the CUDA context (~0.5 GiB), which `--max-gpu-memory-gib` leaves out, as a smaller card's
usable memory does.

Where the settings do not fit, `fit_to_card` either picks smaller micro-batches itself (when TRAIN_BATCH_SIZE was not
set by hand: the optimiser step is the same, its gradient summed over more, smaller micro-batches) or says which
single changes of the settings fit, each checked by this plan, or, when none does, what is missing.
"""

import contextlib
import importlib.util
from typing import NamedTuple

import torch

from gpu_engine.mxfp4_experts import gpu_capability
from model_loader import weight_bytes

# -----------------------------------------------------------------------------
GIB = 2**30
ADAPTER_BYTES_PER_VALUE = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
KV_BYTES = 2  # the engine's caches are bf16
ENGINE_LENGTH_BUCKET = 128  # rollout_engine.LENGTH_BUCKET: cache positions round up to a multiple of this
ENGINE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # rollout_engine.BATCH_BUCKETS
ENGINE_CACHED_STATES = 2  # rollout_engine.MAX_CACHED_GRAPHS: caches of recent sizes kept through training
MAX_EVALUATION_ROWS = 64  # rows of one validation or evaluation pass at most (evaluation.generate_answers)
# Measured (benchmarks/measure_memory_plan.py, benchmarks/RESULTS.md, one H100 80GB, MXFP4 experts, real prompts):
UPDATE_GIB_PER_TOKEN = {  # (expert LoRA?, gradient checkpointing?) -> GiB a micro-batch token adds to an update
    (False, True): 0.46 / 1024,
    (True, True): 0.46 / 1024,  # the expert LoRA's own weights and AdamW state are counted apart (`adapter`)
    (False, False): 6.5 / 1024,  # without checkpointing: from the bf16 measurement (99 GiB vs 45.4 at W)
    (True, False): 6.5 / 1024,
}
UPDATE_FIXED_GIB = 0.6  # an update's transient beyond its tokens' (a dequantised expert matrix, the LM head's chunk)
ROLLOUT_TRANSIENT_GIB = 1.3  # a prefill pass's transient beside the caches (a dequantised expert matrix, activations)
GENERATE_TRANSIENT_GIB = 1.8  # TRL's generate's, a lower bound: its smallest run (1 prompt x 8 answers, micro-batches
#   of 1, rollout planned 14.5 GiB with the engine's 1.3) ran out of memory in its first step under a 15.0 GiB cap
SAFETY_GIB = 0.5  # kept free of the plan: the allocator's fragmentation between phases
# -----------------------------------------------------------------------------


class Plan(NamedTuple):
    """GiB allocated at the peak of each phase (`peaks_gib`), from what each holds (`parts`, GiB); `update_tokens`:
    the tokens of one micro-batch (rows x (longest prompt + MAX_COMPLETION_LEN)), what the update's part grows with."""
    parts: dict
    evaluation_rows: int
    settings: dict
    update_tokens: int

    def peaks_gib(self):
        p = self.parts
        base = p["weights"] + p["adapter"] + p["engine_weights"]
        evaluation = base + p["evaluation_cache"] + p["rollout_transient"]
        return {"rollout": base + p["rollout_cache"] + p["rollout_transient"],
                "update": base + p["kept_cache"] + p["update"],
                "validation": evaluation, "evaluation": evaluation}

    def needed_gib(self):
        return max(self.peaks_gib().values()) + SAFETY_GIB

    def describe(self):
        """'~20.6 GiB: weights 12.8, adapter and optimiser 0.1, rollout caches and copies 2.8, prefill 1.3, update of
        micro-batches of 16 4.4' (the needs beside the weights overlap in time: each phase holds some of them)."""
        p = self.parts
        return (f"~{self.needed_gib():.1f} GiB: weights {p['weights']:.1f}, adapter and optimiser {p['adapter']:.1f}, "
                f"rollout caches and copies {p['engine_weights'] + p['rollout_cache']:.1f}, prefill "
                f"{p['rollout_transient']:.1f}, update of micro-batches of {self.settings['TRAIN_BATCH_SIZE']} "
                f"{p['update']:.1f}")


def bucket(n, sizes):
    return next((s for s in sizes if s >= n), n)


def round_up(n, step):
    return -(-n // step) * step


def adapter_values(config, settings):
    """Trainable values of the run's LoRA: attention q/k/v/o ('all-linear' on gpt-oss; a narrower LORA_TARGETS is
    counted as all four, an upper bound) and, with LORA_EXPERTS, both expert matrices of every expert."""
    h, d, r = config.hidden_size, config.head_dim, settings["LORA_RANK"]
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = r * ((h + q) + 2 * (h + kv) + (q + h))
    per_layer = attention
    if settings["LORA_EXPERTS"]:
        i, e = config.intermediate_size, config.num_local_experts
        per_layer += e * r * ((h + 2 * i) + (i + h))
    return config.num_hidden_layers * per_layer


def engine_weight_bytes(config, experts_format, settings):
    """The rollout engine's copies: q/k/v and o with the LoRA's A rows stacked under them and an expert LoRA's
    factors (bf16), and for MXFP4 experts their scales laid out for the decode kernel (a byte a block of 32 values)."""
    h, d, rank = config.hidden_size, config.head_dim, settings["LORA_RANK"]
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    # decode_step.Projection: weight with A's rows [out + R, in], bias [out + R], B [out, R]
    qkv_out, qkv_rank = q + 2 * kv, 3 * rank
    qkv = (qkv_out + qkv_rank) * (h + 1) + qkv_out * qkv_rank
    o = (h + rank) * (q + 1) + h * rank
    attention = 2 * (qkv + o)
    scales = 0
    if experts_format == "mxfp4" and takes_transposed_kernel():
        scales = config.num_local_experts * 3 * config.hidden_size * config.intermediate_size // 32
    expert_lora = 0
    if settings["LORA_EXPERTS"]:
        expert_lora = 2 * (adapter_values(config, settings) - adapter_values(config, {**settings, "LORA_EXPERTS": False}))
    return config.num_hidden_layers * (attention + scales) + expert_lora


def takes_transposed_kernel():
    """Whether this machine's GPU decodes MXFP4 experts with the 'transposed' kernel, whose scales the engine keeps
    laid out apart (mxfp4_experts.choose_dense_kernel: Hopper); True where no GPU tells (the larger plan)."""
    if not torch.cuda.is_available():
        return True

    return gpu_capability()[0] == 9


def cache_bytes(config, rows, length):
    """One engine state: bf16 K and V of every layer for `rows` (bucketed) x `length` (rounded up) positions, and
    the decode step's fp32 logits and sampling buffers (~4 of [rows, vocab])."""
    rows, length = bucket(rows, ENGINE_BATCH_BUCKETS), round_up(length, ENGINE_LENGTH_BUCKET)
    kv = config.num_hidden_layers * 2 * rows * config.num_key_value_heads * length * config.head_dim * KV_BYTES
    return kv + 4 * rows * config.vocab_size * 4


def cache_states(prompt_lengths, max_new_tokens):
    """How many caches training's rollouts leave with the engine: one, of the longest length, where its attention
    kernel runs (triton installed: RolloutEngine._longest_fitting), else one per length bucket the prompts span, up
    to the kept ones."""
    if importlib.util.find_spec("triton") is not None:
        return 1
    sizes = {round_up(n + max_new_tokens, ENGINE_LENGTH_BUCKET) for n in (min(prompt_lengths), max(prompt_lengths))}
    spanned = (max(sizes) - min(sizes)) // ENGINE_LENGTH_BUCKET + 1
    return min(ENGINE_CACHED_STATES, spanned)


def plan_run(config, experts_format, settings, prompt_lengths, backend="engine", evaluation_rows=None):
    """The Plan of a training run of train_grpo.py's `settings` on one card (see the module docstring).

    prompt_lengths: token counts of the training prompts (the longest sizes a step); backend: the generation back
    end (the engine keeps its caches and weight copies; TRL's own back ends hold a step's cache only while it
    generates); evaluation_rows: rows of a validation or evaluation pass (None: MAX_EVALUATION_ROWS).
    """
    s = settings
    longest = max(prompt_lengths)
    rows = s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    length = longest + s["MAX_COMPLETION_LEN"]
    engine = backend == "engine"
    evaluation_rows = evaluation_rows or MAX_EVALUATION_ROWS
    per_token = UPDATE_GIB_PER_TOKEN[(bool(s["LORA_EXPERTS"]), bool(s["GRADIENT_CHECKPOINTING"]))]
    caches = cache_bytes(config, rows, length) / GIB
    if engine:  # the engine keeps a cache per recent size through the update; TRL's back ends free theirs before it
        caches *= cache_states(prompt_lengths, s["MAX_COMPLETION_LEN"])
    parts = {
        "weights": weight_bytes(config, experts_format) / GIB,
        "adapter": adapter_values(config, s) * ADAPTER_BYTES_PER_VALUE / GIB,
        "engine_weights": engine_weight_bytes(config, experts_format, s) / GIB if engine else 0.0,
        "rollout_cache": caches,
        "kept_cache": caches if engine else 0.0,
        "rollout_transient": ROLLOUT_TRANSIENT_GIB if engine else GENERATE_TRANSIENT_GIB,
        "update": UPDATE_FIXED_GIB + per_token * s["TRAIN_BATCH_SIZE"] * length,  # ... with its fixed part
        "evaluation_cache": cache_bytes(config, evaluation_rows, length) / GIB,
    }
    return Plan(parts, evaluation_rows, dict(s), s["TRAIN_BATCH_SIZE"] * length)


def micro_batches(settings):
    """The (TRAIN_BATCH_SIZE, GRADIENT_ACCUMULATION) pairs of the same step, largest micro-batch first: every divisor
    of the step's completions that divides, or is divided by, NUM_GENERATIONS (train_grpo.check_settings' rule)."""
    completions, generations = settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"], settings["NUM_GENERATIONS"]
    return [(size, completions // size) for size in range(completions, 0, -1)
            if completions % size == 0 and (size % generations == 0 or generations % size == 0)]


def choose_evaluation_rows(config, experts_format, settings, prompt_lengths, usable_gib, backend):
    """The most rows (an engine batch size, at most MAX_EVALUATION_ROWS) a validation or evaluation pass can take
    within `usable_gib` beside what the run keeps; the smallest when none fits (the training plan then refuses)."""
    sizes = [n for n in ENGINE_BATCH_BUCKETS if n <= MAX_EVALUATION_ROWS]
    for rows in reversed(sizes):
        plan = plan_run(config, experts_format, settings, prompt_lengths, backend, evaluation_rows=rows)
        peaks = plan.peaks_gib()
        if max(peaks["validation"], peaks["evaluation"]) + SAFETY_GIB <= usable_gib:
            return rows
    return sizes[0]


class Fit(NamedTuple):
    """fit_to_card's answer: `plan` (of `settings`, possibly with micro-batches the plan chose) fits, or not; `note`
    says what was changed or, when it does not fit, what would (one message naming settings)."""
    fits: bool
    settings: dict
    plan: Plan
    note: str


def flag(name):
    return "--" + name.lower().replace("_", "-")


def alternatives(settings):
    """Single changes that shrink a run, most useful first, as (description, settings): smaller micro-batches, fewer
    prompts a step, shorter completions, no expert LoRA, gradient checkpointing on."""
    s = settings
    options = []
    for size, steps in micro_batches(s):
        if size < s["TRAIN_BATCH_SIZE"]:
            options.append((f"--train-batch-size {size} --gradient-accumulation {steps}",
                            {**s, "TRAIN_BATCH_SIZE": size, "GRADIENT_ACCUMULATION": steps}))
    if not s["GRADIENT_CHECKPOINTING"]:
        options.append(("--gradient-checkpointing true", {**s, "GRADIENT_CHECKPOINTING": True}))
    for prompts in range(s["PROMPTS_PER_STEP"] - 1, 0, -1):
        completions = prompts * s["NUM_GENERATIONS"]
        size = min(s["TRAIN_BATCH_SIZE"], completions)
        if completions % size == 0:
            options.append((f"--prompts-per-step {prompts}" + (f" --train-batch-size {size}"
                                                              if size != s["TRAIN_BATCH_SIZE"] else "")
                            + f" --gradient-accumulation {completions // size}",
                            {**s, "PROMPTS_PER_STEP": prompts, "TRAIN_BATCH_SIZE": size,
                             "GRADIENT_ACCUMULATION": completions // size}))
    length = s["MAX_COMPLETION_LEN"] // 2
    while length >= 64:
        options.append((f"--max-completion-len {length}", {**s, "MAX_COMPLETION_LEN": length}))
        length //= 2
    if s["LORA_EXPERTS"]:
        options.append(("--lora-experts false", {**s, "LORA_EXPERTS": False}))
    return options


def smallest(settings):
    """The run's smallest form: one prompt a step, micro-batches of one, gradient checkpointing, attention LoRA only;
    and the flags that make it of `settings`."""
    generations = settings["NUM_GENERATIONS"]
    least = {**settings, "PROMPTS_PER_STEP": 1, "TRAIN_BATCH_SIZE": 1, "GRADIENT_ACCUMULATION": generations,
             "GRADIENT_CHECKPOINTING": True, "LORA_EXPERTS": False}
    flags = " ".join(f"{flag(name)} {str(value).lower() if isinstance(value, bool) else value}"
                     for name, value in least.items() if value != settings[name])
    return least, flags


def fit_to_card(config, experts_format, settings, prompt_lengths, usable_gib, fixed=(), backend="engine",
                other_format=None):
    """Fit: the run's settings (micro-batches chosen here when TRAIN_BATCH_SIZE and GRADIENT_ACCUMULATION are not in
    `fixed`, the names the user set) and their plan, with evaluation rows that fit; or, when they do not fit, a
    message that names single changes that do (each checked here; `other_format`: an experts format the checkpoint
    also allows, offered as one; TRL's generate where the engine would run), else the smallest form of the run that
    fits, else what is missing."""
    def plan_for(s, fmt=experts_format, generation=backend):
        rows = choose_evaluation_rows(config, fmt, s, prompt_lengths, usable_gib, generation)
        return plan_run(config, fmt, s, prompt_lengths, generation, evaluation_rows=rows)

    plan = plan_for(settings)
    if plan.needed_gib() <= usable_gib:
        return Fit(True, settings, plan, "")
    if not {"TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION"} & set(fixed):
        for size, steps in micro_batches(settings):
            chosen = {**settings, "TRAIN_BATCH_SIZE": size, "GRADIENT_ACCUMULATION": steps}
            smaller = plan_for(chosen)
            if size < settings["TRAIN_BATCH_SIZE"] and smaller.needed_gib() <= usable_gib:
                return Fit(True, chosen, smaller,
                           f"micro-batches of {size} x {steps} instead of {settings['TRAIN_BATCH_SIZE']} x "
                           f"{settings['GRADIENT_ACCUMULATION']} ({plan.needed_gib():.1f} GiB planned, "
                           f"{usable_gib:.1f} usable): the same optimiser step in more, smaller micro-batches")
    options = [(description, changed, experts_format, backend) for description, changed in alternatives(settings)]
    if other_format:
        options.insert(0, (f"--experts-format {other_format}", settings, other_format, backend))
    if backend == "engine":
        options.append(("--generation-backend generate", settings, experts_format, "generate"))
    fitting = []
    for description, changed, fmt, generation in options:
        option = plan_for(changed, fmt, generation)
        if option.needed_gib() <= usable_gib:
            fitting.append(f"`{description}` (~{option.needed_gib():.1f} GiB)")
    message = f"this run needs {plan.describe()}; the card has {usable_gib:.1f} GiB usable"
    if fitting:
        return Fit(False, settings, plan, f"{message}. These fit: " + "; ".join(fitting[:4]))
    least, flags = smallest(settings)
    fmt = other_format or experts_format
    if other_format:
        flags += f" --experts-format {other_format}"
    tried = [(plan_for(least, fmt), flags, backend)]
    if backend == "engine":  # TRL's generate keeps no engine copies of the attention weights
        tried.append((plan_for(least, fmt, "generate"), flags + " --generation-backend generate", "generate"))
    for option, option_flags, _ in tried:
        if option.needed_gib() <= usable_gib:
            return Fit(False, settings, plan, f"{message}. Only the run's smallest form fits: `{option_flags}` "
                                              f"({option.describe()})")
    option, option_flags, generation = min(tried, key=lambda entry: entry[0].needed_gib())
    short = option.needed_gib() - usable_gib
    measured = (f" (at least: TRL's generate's {GENERATE_TRANSIENT_GIB} GiB is a lower bound, from the 20b's "
                "smallest form running out of memory under a 15.0 GiB cap on an H100: benchmarks/RESULTS.md)"
                if generation == "generate" else "")
    return Fit(False, settings, plan, f"{message}. Nothing fits: even the run's smallest form, `{option_flags}`, "
               f"needs {option.describe()}{measured}, {short:.1f} GiB more than the card has; use a card with more "
               "memory (or free what other processes hold on it)")


# -- measured: the peak of each phase ------------------------------------------------------------------------------
class PhasePeaks:
    """Peak GPU memory allocated in each phase of a run (loading, rollout, update, validation, evaluation): each
    phase starts with the peak counter reset, and its peak is the largest seen in any of its stretches. On a CPU it
    records nothing."""

    def __init__(self, device):
        self.enabled = str(device).startswith("cuda")
        self.peaks = {}
        self.current = None

    def enter(self, name):
        """End the current phase (its peak kept) and start `name` (None: no phase); returns the phase ended."""
        if self.enabled:
            if self.current is not None:
                self.peaks[self.current] = max(self.peaks.get(self.current, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        ended, self.current = self.current, name
        return ended

    @contextlib.contextmanager
    def phase(self, name):
        """`name` for the duration of the block, then the phase that was current before it."""
        ended = self.enter(name)
        try:
            yield
        finally:
            self.enter(ended)

    def gib(self):
        """{phase: peak GiB allocated} so far, the current phase's included."""
        self.enter(self.current)
        return {name: round(peak / GIB, 2) for name, peak in self.peaks.items()}
