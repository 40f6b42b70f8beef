"""Fine-tune gpt-oss with GRPO and LoRA to choose thermal-storage actions whose Q-values are best.

    python train_grpo.py --tiny                          # the main job on any machine: embedded stand-in, CPU, < 10 min
    python train_grpo.py                                 # openai/gpt-oss-20b on one GPU (24 GB and up: MXFP4 experts)
    python train_grpo.py --total-steps 50 --out runs/my-run --learning-rate 2e-5
    python train_grpo.py --resume --out runs/my-run      # continue a killed or stopped run at its last checkpoint
    accelerate launch --config_file accelerate_2gpu.yaml train_grpo.py   # 2 GPUs of one host (README: 4, 8, hosts)
    torchrun --standalone --nproc_per_node 2 train_grpo.py --tiny        # 2 CPU processes (gloo), as the tests do

Every constant below can be overridden from the command line (`TOTAL_STEPS` -> `--total-steps`); `--tiny` swaps
in the embedded stand-in (tiny_gpt_oss.py) and the CPU-sized settings of TINY_SETTINGS, under any flags you give.

What it does, in order:
1. checks every setting and validates the data files (data_reward.validate_data_files) before any model is loaded:
   every problem is listed as file:row, and the prompts must be Harmony (run convert_to_harmony.py first);
2. loads MODEL_ID through model_loader (MXFP4 experts kept in MXFP4 on a GPU, dequantised to fp32 on a CPU, or to
   bf16 on a GPU with --experts-format bf16; sink-aware fused attention on GPU, eager on CPU)
   and wraps it with a PEFT LoRA adapter (`all-linear` = attention q/k/v/o on gpt-oss; LORA_EXPERTS adds the
   experts' gate_up_proj/down_proj through `target_parameters`);
3. feeds TRL's GRPOTrainer from StepStream (step_stream.py) with two rewards (training/rewards.py): the Boltzmann
   reward of the action in the final Harmony message (None when invalid) and a format penalty for invalid answers;
   the completions come from GENERATION_BACKEND: on a GPU by default the engine of gpu_engine/rollout_engine.py (CUDA
   graphs, plugged in as TRL's rollout_func), else TRL's own `generate` or transformers' continuous batching; on a CPU
   the loss scores the completions through training/completion_scoring.py (each prompt's forward once for its whole
   group);
4. writes into OUT, once the model is loaded and wrapped (nothing before): the adapter and tokenizer, checkpoints
   every SAVE_STEPS (adapter, optimiser, trainer state; each complete or absent, see training/run_directory.py),
   run_config.json (the resolved settings), TensorBoard logs (runs/<run>/logs; `tensorboard --logdir runs`),
   completions.csv (every scored completion, steps counted from 1, see training/completion_log.py),
   validation.json (each checkpoint's score on VALIDATION_PROMPTS training prompts) and summary.json / summary.md.
   The run's adapter is the best-scoring checkpoint's (training/best_checkpoint.py), not necessarily the last step's; it
   records its base as 'tiny' or a path relative to the repository.
At the end it evaluates the untrained and the trained policy on the held-out split (EVAL_SAMPLES answers per
prompt at temperature 1) beside uniform guessing, the best constant action and the optimal policy.

Several processes (`accelerate launch --num_processes N`, data parallel): each process trains on PROMPTS_PER_STEP
prompts of its own a step (N x PROMPTS_PER_STEP in all, printed at the start): every process reads the same
StepStream and accelerate hands each its own contiguous slice of every step's prompts, each GRPO group whole
(step_stream.py). Each process generates and scores its completions; TRL gathers the rewards for the group
baselines and DDP averages the gradients. The main process alone prints, writes completions.csv (every process's
rows gathered to it, with a `rank` column), run_config.json, validation.json, the adapter and the summary, and runs
the validation and the held-out evaluation; a checkpoint holds each process's RNG state. A run is resumed by as
many processes as started it.

--resume continues OUT from its last complete checkpoint with the settings of its run_config.json (flags given
on the command line win, and are named), drops the completion-log rows of later steps (and a record cut off by
a kill), and says so when the run is already finished. Ctrl-C saves a checkpoint; before the first step ends it
takes back what the start wrote, during the final evaluation it writes the summary without it.

Deviations from textbook GRPO (TRL 1.x defaults unless set here): DAPO loss (token-level normalisation), a KL
term to the base model only as BETA sets it (0 by default, 0.2 with --tiny), one optimiser step per generation
batch (on-policy; steps_per_generation = gradient accumulation), no prompt truncation (over-long prompts are left
out of the stream and reported).
"""

import atexit
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import harmony
import script_settings
from data_reward import DataError, validate_data_files
from output_files import why_not_writable, write_text_atomically

# torch, transformers, TRL, PEFT and this project's modules built on them are imported in the functions that use them,
# once the flags are read: they take ~10 s to import on 2 cores (`python train_grpo.py --help` took 12 s with them at
# the top, 1 s without).

ROOT = Path(__file__).resolve().parent
# -----------------------------------------------------------------------------
# Model and data
MODEL_ID = "openai/gpt-oss-20b"  # Hub id, local model directory, or 'tiny' (the embedded stand-in)
EXPERTS_FORMAT = "auto"  # mxfp4: experts kept as stored, multiplied by gpu_engine/mxfp4_experts.py's kernels
                         #   (~13 GiB of weights: a 24 GB card; an expert LoRA runs beside them as low-rank terms);
                         #   bf16: dequantised on load (an 80 GB card at 20b); auto: mxfp4 on a GPU, dequantised on CPU
MAX_GPU_MEMORY_GIB = 0.0  # cap this process's GPU memory (0 = the whole card): e.g. 23 shows on a big card whether
                          #   a run fits a 24 GB one
DATA_FILES = ["data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"]  # Harmony CSVs with rewards
TRAIN_SPLIT = "train"  # rows of this `split` train
EVAL_SPLIT = "eval"  # rows of this `split` are held out for the final evaluation
OUT = "runs/grpo-gpt-oss-20b"  # run directory: adapter, checkpoints, logs, summary
# GRPO batch: PROMPTS_PER_STEP * NUM_GENERATIONS completions per optimiser step and process,
# processed TRAIN_BATCH_SIZE at a time over GRADIENT_ACCUMULATION micro-batches (all three per process, like TRL's
# per_device_train_batch_size: N processes of `accelerate launch` train on N times as many prompts a step)
NUM_GENERATIONS = 8  # completions per prompt (one GRPO group)
PROMPTS_PER_STEP = 4  # prompts (groups) per optimiser step, in each process
TRAIN_BATCH_SIZE = 16  # completions per forward/backward micro-batch (fewer, larger micro-batches are faster and
                       #   take more memory: benchmarks/RESULTS.md; on a GPU the memory plan may choose smaller)
GRADIENT_ACCUMULATION = 2  # micro-batches per optimiser step (= PROMPTS_PER_STEP * NUM_GENERATIONS / TRAIN_BATCH_SIZE)
MAX_PROMPT_LEN = 1024  # prompts longer than this (in tokens) are left out and reported
MAX_COMPLETION_LEN = 256  # tokens a completion may use before it counts as truncated (invalid)
# Optimisation
TOTAL_STEPS = 200  # optimiser steps
SAVE_STEPS = 25  # checkpoint every this many steps
LEARNING_RATE = 1e-5  # AdamW peak learning rate of the LoRA weights
LR_SCHEDULE = "constant"  # constant | cosine: the learning rate after the warm-up (cosine learned less on the
                          #   stand-in within a fixed number of steps: benchmarks/RESULTS.md)
WARMUP_STEPS = 10  # linear warm-up from 0 to LEARNING_RATE over this many steps
MIN_LR_RATIO = 0.1  # cosine decays to LEARNING_RATE * MIN_LR_RATIO at TOTAL_STEPS, not to 0
MAX_GRAD_NORM = 1.0  # clip the gradient's global norm to this (0 = no clipping)
LOSS_TYPE = "dapo"  # TRL loss: dapo | grpo | dr_grpo | bnpo | ...
BETA = 0.0  # KL penalty to the base model (0 = none, TRL's default; saves a reference forward pass)
FORMAT_PENALTY = 1.0  # reward of an invalid answer (no final action, truncated, ambiguous): -FORMAT_PENALTY
TOP_ENTROPY_QUANTILE = 1.0  # train only on this top fraction of tokens by entropy (1.0 = all; 0.2 in arXiv:2506.01939)
GRADIENT_CHECKPOINTING = True  # recompute activations in backward: less memory, ~30% slower
# LoRA
LORA_RANK = 16  # adapter rank
LORA_ALPHA = 32  # adapter scale numerator (scale = alpha / rank)
LORA_TARGETS = "all-linear"  # PEFT target_modules; on gpt-oss 'all-linear' is attention q/k/v/o
LORA_EXPERTS = False  # also adapt the MoE experts (gate_up_proj, down_proj) through target_parameters
# Generation
REASONING_EFFORT = "low"  # must match the prompts' 'Reasoning:' line (convert_to_harmony.py renders it into them)
TEMPERATURE = 1.0  # sampling temperature of the GRPO rollouts
TOP_P = 1.0  # nucleus sampling of the rollouts
GENERATION_BACKEND = "auto"  # engine (gpu_engine/rollout_engine.py, CUDA graphs) | continuous-batching | generate;
                             #   auto: the engine on a GPU for a model it runs, else generate (training/generation.py)
# Evaluation and logging
EVAL_SAMPLES = 0  # answers per held-out prompt in the final before/after evaluation (0 = skip)
EVAL_MAX_PROMPTS = 0  # held-out prompts evaluated (0 = all)
VALIDATION_PROMPTS = 32  # training-split prompts that score every checkpoint; the best one becomes the adapter
                         #   (0 = no scoring: the last step's adapter is kept)
VALIDATION_SAMPLES = 4  # answers per validation prompt (temperature TEMPERATURE, the same seeds at every checkpoint)
REPORT_TO = "tensorboard"  # TRL/transformers trackers: tensorboard | wandb | trackio | none
SEED = 42  # seeds the stream, the sampling and the adapter's initialisation
# The main job on a CPU: the embedded stand-in with settings sized for 2 cores and < 10 minutes
TINY_SETTINGS = dict(
    MODEL_ID="tiny",
    OUT="runs/grpo-tiny",
    NUM_GENERATIONS=4,  # measured across seeds: 8 prompts x 4 beat 4 x 8 at the same cost per step
    PROMPTS_PER_STEP=8,
    TRAIN_BATCH_SIZE=32,
    GRADIENT_ACCUMULATION=1,
    MAX_COMPLETION_LEN=64,
    TOTAL_STEPS=800,
    SAVE_STEPS=100,
    LEARNING_RATE=2e-3,
    LR_SCHEDULE="constant",  # measured across seeds: cosine decays (peak 3e-3 to 6e-3) learned less in 800 steps
    WARMUP_STEPS=20,
    BETA=0.2,  # KL to the untrained stand-in: keeps its Harmony format and holds the held-out reward up (screen of
               #   seeds 1 and 2, benchmarks/RESULTS.md: 0.355 / 0.370 trained reward; 0.1: 0.348 / 0.352; 0.3:
               #   0.348 / 0.363)
    LORA_EXPERTS=True,  # also adapt the experts (more capacity where the MLPs decide; measured with BETA above)
    GRADIENT_CHECKPOINTING=False,
    GENERATION_BACKEND="engine",  # on a CPU the engine samples exactly generate's tokens (same seed, same adapter:
                                  #   tested), faster (benchmarks/RESULTS.md)
    EVAL_SAMPLES=4,
    VALIDATION_PROMPTS=128,
    VALIDATION_SAMPLES=2,
)
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper() and name not in ("ROOT", "TINY_SETTINGS")]
LR_SCHEDULES = ("constant", "cosine")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # the losses TRL 1.x implements
ADAPTER_SHAPE = ("LORA_RANK", "LORA_TARGETS", "LORA_EXPERTS")  # settings a resumed run cannot change


def build_parser():
    """Flags from the constants block (script_settings.py), plus --tiny and --resume."""
    parser = script_settings.build_parser(__doc__, {name: globals()[name] for name in SETTINGS}, __file__,
                                          notes={name: f"--tiny: {script_settings.format_default(value)}"
                                                 for name, value in TINY_SETTINGS.items()})
    parser.add_argument("--tiny", action="store_true", help="the embedded stand-in and the CPU-sized settings of "
                        "TINY_SETTINGS (flags still win)")
    parser.add_argument("--resume", action="store_true", help="continue OUT from its last complete checkpoint, "
                        "with the settings of its run_config.json (flags given here win)")
    return parser


def resolve_settings(args, log, processes=1):
    """Constants, then TINY_SETTINGS when --tiny, then explicit flags.

    With --resume the run's own run_config.json takes the place of the constants and TINY_SETTINGS (--tiny then only
    picks the default OUT), the flags given still win, and `log` hears which settings they change. The run must be
    resumed by as many `processes` as trained it.
    """
    from training import run_directory

    settings = {name: globals()[name] for name in SETTINGS}
    if args.tiny:
        settings.update(TINY_SETTINGS)
    if not args.resume:
        return script_settings.apply_flags(args, settings)
    out = run_path(args.out or settings["OUT"])
    try:
        stored = run_directory.read_run_config(out)
    except run_directory.RunDirectoryError as error:
        raise SystemExit(f"error: {error}") from None
    settings.update({name: value for name, value in stored.items() if name in settings})
    settings["OUT"] = str(out)  # where the run is now, wherever it was started
    changed = [name for name in script_settings.given_flags(args, settings)
               if name != "OUT" and getattr(args, name.lower()) != settings[name]]
    for name in changed:
        if name in ADAPTER_SHAPE:
            raise SystemExit(f"error: --resume: {name} of {out} is {settings[name]!r}; the checkpoints hold an "
                             f"adapter of that shape, so it cannot change (start a new run with another --out)")
    launched = stored.get("PROCESSES", 1)  # a run from before several processes could train had one
    if launched != processes:
        raise SystemExit(f"error: --resume: {out} was trained by {launched} process(es), this launch has {processes}; "
                         "which prompts the done steps used and the size of a step depend on it, so continue it with "
                         f"as many: {resume_command(out, launched)}")
    log(f"resuming {out} with the settings of its {run_directory.RUN_CONFIG}"
        + ("; changed on the command line: " + ", ".join(f"{name} {settings[name]!r} -> "
                                                         f"{getattr(args, name.lower())!r}" for name in changed)
           if changed else ""))
    return script_settings.apply_flags(args, settings)


def run_path(out):
    """OUT as an absolute path (a relative one is taken from the repository root)."""
    out = Path(out).expanduser()
    return out if out.is_absolute() else ROOT / out


def check_settings(s):
    """Settings that cannot work -> one message naming the setting and the fix, before anything is written."""
    from training import generation

    at_least = {"NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 1, "TRAIN_BATCH_SIZE": 1, "GRADIENT_ACCUMULATION": 1,
                "MAX_PROMPT_LEN": 1, "MAX_COMPLETION_LEN": 1, "TOTAL_STEPS": 1, "SAVE_STEPS": 1, "LORA_RANK": 1,
                "EVAL_SAMPLES": 0, "EVAL_MAX_PROMPTS": 0, "SEED": 0, "WARMUP_STEPS": 0,
                "VALIDATION_PROMPTS": 0, "VALIDATION_SAMPLES": 1}
    for name, least in at_least.items():
        if s[name] < least:
            why = " (GRPO compares completions within a group)" if name == "NUM_GENERATIONS" else ""
            raise SystemExit(f"error: --{flag(name)} must be at least {least}{why}, got {s[name]}")
    if s["SEED"] > MAX_SEED:
        raise SystemExit(f"error: --seed must be at most {MAX_SEED} (numpy and TRL take 32-bit seeds), got {s['SEED']}")
    for name, low, high, closed_low in (("LEARNING_RATE", 0, math.inf, False), ("TEMPERATURE", 0, math.inf, False),
                                        ("LORA_ALPHA", 0, math.inf, False), ("BETA", 0, math.inf, True),
                                        ("FORMAT_PENALTY", 0, math.inf, True), ("TOP_P", 0, 1, False),
                                        ("TOP_ENTROPY_QUANTILE", 0, 1, False), ("MIN_LR_RATIO", 0, 1, True),
                                        ("MAX_GRAD_NORM", 0, math.inf, True)):
        value = s[name]
        if not (math.isfinite(value) and (low <= value if closed_low else low < value) and value <= high):
            where = f"{'at least' if closed_low else 'above'} {low}" + (f" and at most {high}" if high < math.inf
                                                                          else "")
            raise SystemExit(f"error: --{flag(name)} must be a number {where}, got {value} (the default is "
                             f"{globals()[name]})")
    if s["LR_SCHEDULE"] not in LR_SCHEDULES:
        raise SystemExit(f"error: --lr-schedule {s['LR_SCHEDULE']!r} is not one of {', '.join(LR_SCHEDULES)}")
    if s["LOSS_TYPE"] not in LOSS_TYPES:
        raise SystemExit(f"error: --loss-type {s['LOSS_TYPE']!r} is not one of {', '.join(LOSS_TYPES)}")

    if s["REASONING_EFFORT"] not in harmony.REASONING_EFFORTS:
        raise SystemExit(f"error: --reasoning-effort {s['REASONING_EFFORT']!r} is not one of "
                         f"{', '.join(harmony.REASONING_EFFORTS)}")
    check_report_to(s["REPORT_TO"])
    if not s["DATA_FILES"]:
        raise SystemExit("error: --data-files names no file")
    completions = s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    if completions != s["TRAIN_BATCH_SIZE"] * s["GRADIENT_ACCUMULATION"]:
        raise SystemExit(
            f"error: PROMPTS_PER_STEP * NUM_GENERATIONS = {completions} completions per step, but TRAIN_BATCH_SIZE * "
            f"GRADIENT_ACCUMULATION = {s['TRAIN_BATCH_SIZE'] * s['GRADIENT_ACCUMULATION']}: make them equal "
            f"(e.g. --gradient-accumulation {max(1, completions // s['TRAIN_BATCH_SIZE'])} if that divides evenly)"
        )
    if s["TRAIN_BATCH_SIZE"] % s["NUM_GENERATIONS"] and s["NUM_GENERATIONS"] % s["TRAIN_BATCH_SIZE"]:
        raise SystemExit("error: TRAIN_BATCH_SIZE and NUM_GENERATIONS must divide one another")
    if s["EXPERTS_FORMAT"] not in EXPERTS_FORMATS:
        raise SystemExit(f"error: --experts-format {s['EXPERTS_FORMAT']!r} is not one of {', '.join(EXPERTS_FORMATS)}")
    if not (math.isfinite(s["MAX_GPU_MEMORY_GIB"]) and s["MAX_GPU_MEMORY_GIB"] >= 0):
        raise SystemExit(f"error: --max-gpu-memory-gib must be 0 (no cap) or a number of GiB, got "
                         f"{s['MAX_GPU_MEMORY_GIB']}")

    try:
        generation.check_backend(s["GENERATION_BACKEND"], "cuda")  # the name; the device is checked once it is known
    except ValueError as error:
        raise SystemExit(f"error: GENERATION_BACKEND: {error}") from None


MAX_SEED = 2**32 - 1  # the largest seed numpy's legacy seeding (TRL's set_seed) accepts
EXPERTS_FORMATS = ("auto", "bf16", "mxfp4")  # model_loader.EXPERTS_FORMAT_CHOICES, named here so that settings
                                             #   are checked before torch is imported
# Said whenever generation runs out of memory: the settings that shrink it, most effective first.
MEMORY_ADVICE = (
    "Reduce memory with --train-batch-size (and raise --gradient-accumulation to keep the batch), "
    "--max-completion-len, --num-generations, --prompts-per-step or --lora-rank, keep --gradient-checkpointing "
    "true, and use --generation-backend engine (it holds only a static KV cache of the step's size) or generate."
)


def flag(name):
    return name.lower().replace("_", "-")


def check_report_to(report_to):
    """REPORT_TO: 'none', or comma-separated trackers that transformers knows and that are installed."""
    from transformers.integrations import integration_utils

    for name in report_trackers(report_to):
        if name not in integration_utils.INTEGRATION_TO_CALLBACK:
            raise SystemExit(f"error: --report-to {name!r} is not a tracker transformers knows; use none or one of "
                             f"{', '.join(integration_utils.INTEGRATION_TO_CALLBACK)}")
        if name not in integration_utils.get_available_reporting_integrations():
            raise SystemExit(f"error: --report-to {name}: its package is not installed (pip install {name}); or "
                             "use --report-to tensorboard or none")


def read_data(settings):
    """Validated data frames of the training and held-out splits (exits with file:row messages on bad data)."""
    paths = [str(ROOT / p) if not os.path.isabs(p) else p for p in settings["DATA_FILES"]]
    try:
        frames = validate_data_files(paths, require_rewards=True)
    except DataError as error:
        raise SystemExit(f"error: the training data has problems:\n{error}") from None
    problems = []
    for path, frame in frames.items():
        if not frame["prompt"].map(harmony.is_harmony_prompt).all():
            problems.append(f"{path}: prompts are not Harmony; run `python convert_to_harmony.py {path}` and train "
                            "on the _harmony.csv it writes")
        if "split" not in frame:
            problems.append(f"{path}: no `split` column; mark rows train / eval")
        efforts = set(frame["prompt"].str.extract(r"Reasoning: (\w+)", expand=False).dropna())
        if efforts - {settings["REASONING_EFFORT"]}:
            problems.append(f"{path}: prompts were rendered with reasoning effort {', '.join(sorted(efforts))}, "
                            f"REASONING_EFFORT is {settings['REASONING_EFFORT']!r}; convert again with "
                            f"--reasoning-effort {settings['REASONING_EFFORT']} or pass the matching --reasoning-effort")
    if problems:
        raise SystemExit("error: " + "\n".join(problems))
    train = {p: f[f["split"] == settings["TRAIN_SPLIT"]] for p, f in frames.items()}
    held_out = {p: f[f["split"] == settings["EVAL_SPLIT"]] for p, f in frames.items()}
    splits = ", ".join(sorted(set().union(*(f["split"].unique() for f in frames.values()))))
    for name, split, chosen, needed in (("train", "TRAIN_SPLIT", train, True),
                                        ("eval", "EVAL_SPLIT", held_out, settings["EVAL_SAMPLES"] > 0)):
        if needed and not any(len(f) for f in chosen.values()):
            raise SystemExit(f"error: no rows with split == {settings[split]!r} in {', '.join(map(str, frames))} "
                             f"(the splits there: {splits}); pass --{flag(name + '_split')} with one of them"
                             + (" or --eval-samples 0" if name == "eval" else ""))
    return {p: f for p, f in train.items() if len(f)}, held_out


def load_for_training(settings, train_frames, device, log, phases, fixed=(), processes=None):
    """(LoRA-wrapped model, tokenizer, prompt pool, memory plan or None): everything that can fail on the settings,
    before any write. On a GPU the memory plan comes first: it may choose smaller micro-batches (TRAIN_BATCH_SIZE and
    GRADIENT_ACCUMULATION, in `settings`, unless they are among the `fixed` names the user set), or refuse the
    settings with a message naming ones that fit; `phases` (memory_plan.PhasePeaks) measures the loading."""
    from peft import get_peft_model

    import model_loader
    from step_stream import make_pool

    try:
        config = model_loader.load_config(model_loader.resolve_model_id(settings["MODEL_ID"]))  # a bad id fails here
        tokenizer = model_loader.load_tokenizer(settings["MODEL_ID"])
        pool, too_long = make_pool(train_frames, tokenizer, settings["MAX_PROMPT_LEN"])
        if not pool:
            raise SystemExit(f"error: all {len(too_long)} training prompts are longer than MAX_PROMPT_LEN="
                             f"{settings['MAX_PROMPT_LEN']} tokens (first: {too_long[0]}); raise --max-prompt-len "
                             f"(the default is {MAX_PROMPT_LEN})")
        if too_long:
            log(f"warning: {len(too_long)} prompts are longer than MAX_PROMPT_LEN={settings['MAX_PROMPT_LEN']} "
                f"tokens and are left out (first: {too_long[0]}); raise --max-prompt-len to keep them")
        log(f"{len(pool)} training prompts from {len(train_frames)} file(s); loading {settings['MODEL_ID']} on {device}")
        start, plan, headroom = time.time(), None, 0.0
        if device == "cuda":
            if settings["MAX_GPU_MEMORY_GIB"]:
                cap_gpu_memory(settings["MAX_GPU_MEMORY_GIB"], log)
            lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in pool], add_special_tokens=False)["input_ids"]]
            plan = plan_gpu_memory(settings, config, lengths, fixed, processes, log)
            headroom = plan.needed_gib() - plan.parts["weights"]
        with phases.phase("loading"):
            model = model_loader.load_model(settings["MODEL_ID"], device=device,
                                            experts_format=settings["EXPERTS_FORMAT"], headroom_gib=headroom)
        log(f"model loaded in {time.time() - start:.0f} s (experts: {model_loader.experts_format_of(model)})")
    except model_loader.ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None

    check_lora_targets(model, settings["LORA_TARGETS"])

    model = get_peft_model(model, lora_config(settings))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA: {trainable:,} trainable parameters")
    return model, tokenizer, pool, plan


def plan_gpu_memory(settings, config, prompt_lengths, fixed, processes, log):
    """The memory plan of this run on this card (memory_plan.fit_to_card, the card's usable memory the smallest of
    every process's): adopts the micro-batches it chose into `settings`, or exits with its message."""
    from accelerate.utils import gather_object

    import model_loader
    from training import memory_plan

    model_loader.check_gpu_generation("cuda")  # an older card hears why before any plan
    usable = model_loader.usable_gpu_bytes() / 2**30
    if processes is not None and processes.num_processes > 1:
        usable = min(gather_object([usable]))  # every process must choose the same micro-batches
    quantized = bool(getattr(config, "quantization_config", None))
    experts_format = model_loader.choose_experts_format(settings["EXPERTS_FORMAT"], "cuda", quantized)
    backend = "engine" if settings["GENERATION_BACKEND"] in ("auto", "engine") else settings["GENERATION_BACKEND"]
    fit = memory_plan.fit_to_card(config, experts_format, settings, prompt_lengths, usable, fixed, backend,
                                  other_format="mxfp4" if experts_format == "bf16" and quantized else None)
    if not fit.fits:
        raise SystemExit(f"error: {settings['MODEL_ID']} with --experts-format {experts_format}: {fit.note}")
    if fit.note:
        log(f"memory plan: {fit.note}")
    settings.update(fit.settings)
    peaks = fit.plan.peaks_gib()
    log(f"memory plan: {', '.join(f'{phase} ~{gib:.1f}' for phase, gib in peaks.items())} GiB of {usable:.1f} usable; "
        f"validation and evaluation in passes of {fit.plan.evaluation_rows} answers")
    return fit.plan


def cap_gpu_memory(gib, log):
    """Let this process allocate at most `gib` GiB of the GPU, as if the card had no more."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    log(f"GPU memory capped at {gib:g} GiB of {total / 2**30:.0f}")


def check_lora_targets(model, targets):
    """Every name in LORA_TARGETS must name modules of the model (PEFT only complains when none does)."""
    import torch

    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets.split(",") if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SystemExit(f"error: --lora-targets: {', '.join(unknown)} names no module of {model.config.model_type}; "
                         f"its linear layers are {', '.join(linear)}: name some of them (comma-separated), or use "
                         "all-linear")


def use_writable_caches(log):
    """The datasets library caches the stream's generator under HF_DATASETS_CACHE (~/.cache/huggingface/datasets):
    where that cannot be written (a service account's read-only HOME), a temporary directory of this process takes
    its place, removed at exit, and the log says so and which variable chooses another."""
    import datasets.config

    reason = why_not_writable(Path(datasets.config.HF_DATASETS_CACHE), directory=True)
    if reason is None:
        return
    temporary = tempfile.mkdtemp(prefix="grpo-datasets-cache-")
    atexit.register(shutil.rmtree, temporary, ignore_errors=True)
    os.environ["HF_DATASETS_CACHE"] = temporary
    datasets.config.HF_DATASETS_CACHE = Path(temporary)  # read at import: the variable alone comes too late
    log(f"the datasets cache cannot be written ({reason}): using {temporary} for this run (set HF_DATASETS_CACHE to "
        "a writable directory to choose one)")


def lora_config(settings):
    """PEFT's LoraConfig for train_grpo.py's LORA_* settings (expert LoRA through PEFT's target_parameters, on
    MXFP4-resident experts through expert_lora's wrapper)."""
    from peft import LoraConfig

    from gpu_engine import expert_lora

    targets = settings["LORA_TARGETS"]
    return expert_lora.register(LoraConfig(
        r=settings["LORA_RANK"],
        lora_alpha=settings["LORA_ALPHA"],
        lora_dropout=0.0,  # must be 0 for target_parameters (expert LoRA)
        target_modules=targets if targets == "all-linear" else targets.split(","),
        target_parameters=expert_lora.EXPERT_TARGETS if settings["LORA_EXPERTS"] else None,
        task_type="CAUSAL_LM",
    ))


def checkpointing_fields(enabled):
    """GRPOConfig's gradient-checkpointing switch under the name the installed transformers reads: >= 5.2x renamed it
    activation_checkpointing and warns at the old name alone (TRL's GRPOConfig turns the old one on by default);
    5.17 has only the old one."""
    from trl import GRPOConfig

    fields = {"gradient_checkpointing": enabled}
    if "activation_checkpointing" in {field.name for field in dataclasses.fields(GRPOConfig)}:
        fields["activation_checkpointing"] = enabled
    return fields


def grpo_config(settings, device, backend):
    """TRL's GRPOConfig for train_grpo.py's settings (a dict of its constants), on `device`, generating with
    `backend`."""
    from trl import GRPOConfig

    from training import generation
    from training.rewards import reward_weights

    out = settings["OUT"]
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(out) / "logs"))  # transformers 5 has no logging_dir
    return GRPOConfig(
        output_dir=out,
        max_steps=settings["TOTAL_STEPS"],
        save_steps=settings["SAVE_STEPS"],
        save_strategy="steps",
        logging_steps=1,
        learning_rate=settings["LEARNING_RATE"],
        # transformers' schedulers: warm-up, then constant or a cosine that ends at MIN_LR_RATIO of the peak
        lr_scheduler_type="cosine_with_min_lr" if settings["LR_SCHEDULE"] == "cosine" else "constant_with_warmup",
        lr_scheduler_kwargs={"min_lr_rate": settings["MIN_LR_RATIO"]} if settings["LR_SCHEDULE"] == "cosine" else {},
        warmup_steps=settings["WARMUP_STEPS"],
        max_grad_norm=settings["MAX_GRAD_NORM"],  # 0: transformers clips nothing
        per_device_train_batch_size=settings["TRAIN_BATCH_SIZE"],
        gradient_accumulation_steps=settings["GRADIENT_ACCUMULATION"],
        steps_per_generation=settings["GRADIENT_ACCUMULATION"],
        num_generations=settings["NUM_GENERATIONS"],
        max_completion_length=settings["MAX_COMPLETION_LEN"],
        temperature=settings["TEMPERATURE"],
        top_p=settings["TOP_P"],
        **generation.trl_settings(backend, settings),
        loss_type=settings["LOSS_TYPE"],
        beta=settings["BETA"],
        top_entropy_quantile=settings["TOP_ENTROPY_QUANTILE"],
        reward_weights=reward_weights(),
        shuffle_dataset=False,  # StepStream already orders prompts (no repeats, fair across files)
        **checkpointing_fields(settings["GRADIENT_CHECKPOINTING"]),
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to=report_trackers(settings["REPORT_TO"]),
        seed=settings["SEED"],
        data_seed=settings["SEED"],
        log_completions=False,  # completions.csv holds them, with the Harmony markers kept
        save_only_model=False,
        dataloader_num_workers=0,
    )


def report_trackers(report_to):
    return [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]


def make_trainer(model, tokenizer, pool, completion_log, settings, device, generator, log, callbacks=(),
                 memory_phases=None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    import model_loader
    from step_stream import StepStream
    from training.grpo_trainer import TesGRPOTrainer
    from training.rewards import make_reward_functions
    from training.run_summary import make_progress_printer

    use_writable_caches(log)
    stream = StepStream(pool, seed=settings["SEED"])
    log(f"generation: {generator.name}")
    trainer = TesGRPOTrainer(
        model=model,
        reward_funcs=make_reward_functions(tokenizer, settings["FORMAT_PENALTY"]),
        completion_log=completion_log,
        args=grpo_config(settings, device, generator.name),
        train_dataset=stream.as_dataset(),
        processing_class=tokenizer,
        rollout_func=generator.rollout_func(),
        callbacks=[make_progress_printer(settings["TOTAL_STEPS"], max(1, settings["TOTAL_STEPS"] // 20)),
                   *callbacks],
        generation_backend=generator.name,
        memory_phases=memory_phases,
        # saved adapters name a base that another checkout finds again
        base_model_id=model_loader.portable_model_id(settings["MODEL_ID"]),
    )
    trainer.remove_callback(ProgressCallback)  # one compact line per PROGRESS window instead of a dict per step
    trainer.remove_callback(PrinterCallback)
    return trainer


def main(argv=None, callbacks=()):
    """Train with the command line `argv` (None: sys.argv); `callbacks`: more transformers TrainerCallbacks for the
    trainer (benchmarks/profile_grpo_step.py's profiler)."""
    from training import interrupts

    args = build_parser().parse_args(argv)
    interrupts.stop_on_sigterm()
    processes = start_processes()
    try:
        train(args, processes, callbacks)
    except SystemExit as stop:
        if processes.is_main_process or not isinstance(stop.code, str):
            raise
        raise SystemExit(1) from None  # the main process says why; the others stop without saying it again
    # every process past its last collective before the group goes: a gloo process torn down while another still
    # waits on it can abort at exit ("terminate called without an active exception") after a finished run
    processes.wait_for_everyone()
    processes.destroy_process_group()  # NCCL warns at exit otherwise; nothing to do with one process


def start_processes():
    """accelerate's state of this process: the only one under `python`, one of several under a launcher.

    Under `accelerate launch` (or torchrun) it joins the others: NCCL on GPUs, each process bound to its own GPU;
    gloo on CPUs, which accelerate takes as one distributed run only when told cpu=True.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def resume_command(out, processes):
    """The command that continues the run in `out` with the same number of processes."""
    launch = "python" if processes == 1 else f"accelerate launch --num_processes {processes}"
    return f"{launch} train_grpo.py --resume --out {out}"


def train(args, processes, callbacks=()):
    """The run, in every process: the main one alone prints and writes what is not a checkpoint part (see README)."""
    import torch

    import model_loader
    from training import best_checkpoint, generation, interrupts, memory_plan, run_directory
    from training.completion_log import CompletionLog
    from training.evaluation import evaluate_held_out
    from training.memory_plan import PhasePeaks
    from training.run_summary import (describe_batch, device_name, render_summary, summarize_log, summarize_speed,
                                      write_summary)

    main_process = processes.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main_process else (lambda msg: None)
    try:
        settings = resolve_settings(args, log, processes.num_processes)
        check_settings(settings)
        log(describe_batch(processes.num_processes, settings["PROMPTS_PER_STEP"], settings["NUM_GENERATIONS"]))
        out = run_path(settings["OUT"])
        if out.resolve() == ROOT.resolve():
            raise SystemExit("error: --out must name a run directory (e.g. runs/my-run), not the repository itself")
        settings["OUT"] = str(out)
        try:
            checkpoint = run_directory.check_run_dir(out, args.resume, log, tidy=main_process)
        except run_directory.RunDirectoryError as error:
            raise SystemExit(f"error: {error}") from None
        start_step = checkpoint[0] if checkpoint else 0
        if checkpoint and best_checkpoint.finish_if_done(out, start_step, settings["TOTAL_STEPS"], log,
                                                       write=main_process):
            return
        train_frames, held_out = read_data(settings)  # before any model is loaded

        device = "cuda" if processes.device.type == "cuda" else "cpu"  # model_loader.pick_device, as accelerate chose
        try:
            generation.check_backend(settings["GENERATION_BACKEND"], device)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        torch.manual_seed(settings["SEED"])
        phases = PhasePeaks(device)
        model, tokenizer, pool, plan = load_for_training(settings, train_frames, device, log, phases,
                                                         script_settings.given_flags(args, settings), processes)
        backend = generation.resolve(settings["GENERATION_BACKEND"], model, device)
        generator = generation.Generator(backend, model, tokenizer)  # one engine: training, validation, evaluation
        evaluation_rows = plan.evaluation_rows if plan else memory_plan.MAX_EVALUATION_ROWS
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted before training started; nothing was written") from None

    # From here on OUT is written (by the main process, and checkpoint parts by each process). A start that ends
    # before its first optimiser step takes back what it wrote.
    created_out, present_before, trainer = not out.exists(), run_directory.run_files_present(out), None

    def steps_done():
        return trainer.state.global_step - start_step if trainer is not None else 0

    def forget_if_nothing_done():
        if steps_done() <= 0 and start_step == 0:
            if main_process:
                run_directory.forget_failed_start(out, present_before, created_out)
            return True
        return False

    try:
        processes.wait_for_everyone()  # every process has looked at OUT before the main one writes into it
        settings["MODEL_PATH"] = model_loader.resolve_model_id(settings["MODEL_ID"])
        settings["PROCESSES"] = processes.num_processes  # a resumed run must be launched with as many
        record = make_settings_record(settings, out, main_process)
        if not args.resume:
            record.write()  # the marker of a run directory, before anything else is written into it
        completion_log = None
        if os.environ.get("GRPO_LOG_COMPLETIONS", "1") != "0":
            steps_per_generation = int(os.environ.get("GRPO_STEPS_PER_GENERATION", settings["GRADIENT_ACCUMULATION"]))
            completion_log = CompletionLog(os.environ.get("GRPO_COMPLETION_LOG_PATH", out / "completions.csv"),
                                           steps_per_generation)
        if args.resume and completion_log is not None and main_process:
            dropped, torn = completion_log.keep_steps_up_to(start_step)
            log(f"completion log: dropped {dropped} rows of steps after {start_step}"
                + ("; and a last record cut off by a kill" if torn else ""))
        if checkpoint:
            log(f"resuming from {checkpoint[1].name} (step {start_step})")
        scorer = None
        if settings["VALIDATION_PROMPTS"] and main_process:  # the others train on meanwhile, up to the next gather
            scorer = best_checkpoint.make_validation_callback(
                tokenizer, best_checkpoint.pick_validation_rows(train_frames, pool, settings["VALIDATION_PROMPTS"],
                                                                settings["SEED"]),
                settings, generator, out, best_checkpoint.read_history(out, start_step) if checkpoint else [], log,
                batch_size=evaluation_rows, memory_phases=phases)
        trainer = make_trainer(model, tokenizer, pool, completion_log, settings, device, generator, log,
                               [record] + ([scorer] if scorer else []) + list(callbacks), memory_phases=phases)
        start = time.time()
        phases.enter("update")  # a step is an update, but for its rollout (TesGRPOTrainer._generate)
        trainer.train(resume_from_checkpoint=str(checkpoint[1]) if checkpoint else None)
        phases.enter(None)
    except KeyboardInterrupt:
        if forget_if_nothing_done():
            raise SystemExit(f"\ninterrupted before the first step ended; nothing was kept in {out}: run the same "
                             "command to start again") from None
        if steps_done() <= 0:
            raise SystemExit(f"\ninterrupted before step {start_step + 1} ended; {out} still continues from "
                             f"checkpoint-{start_step}: {resume_command(out, processes.num_processes)}") from None
        if processes.num_processes > 1:
            # each process stops at its own point, so a checkpoint (a collective save) cannot be made safely
            raise SystemExit(f"\ninterrupted at step {trainer.state.global_step}; with several processes Ctrl-C "
                             f"saves no checkpoint: {out} continues from its last one with: "
                             f"{resume_command(out, processes.num_processes)}") from None
        if not (out / f"checkpoint-{trainer.state.global_step}").is_dir():
            with interrupts.deferred_interrupts("the checkpoint is saved", then_stop=False):  # a 2nd Ctrl-C or SIGTERM
                trainer.save_checkpoint_now()
        raise SystemExit(f"\ninterrupted at step {trainer.state.global_step}: checkpoint saved in {out}; "
                         f"continue with: {resume_command(out, processes.num_processes)}") from None
    except torch.OutOfMemoryError:
        forget_if_nothing_done()
        raise SystemExit(f"error: the GPU ran out of memory (generation backend: {backend}). {MEMORY_ADVICE}") from None
    except generation.GenerationFailed as error:
        forget_if_nothing_done()
        raise SystemExit(f"error: {error}. {MEMORY_ADVICE}") from None
    except BaseException:
        forget_if_nothing_done()
        raise
    train_seconds = time.time() - start
    completions_per_step = processes.num_processes * settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    memory = phases.gib()
    speed = summarize_speed(trainer.state.log_history, device, start_step, completions_per_step,
                            max(memory.values()) if memory else None)
    if not main_process:
        return  # the main process keeps the adapter, evaluates it and writes the summary
    summary = {"out": str(out), "device": device_name(device), "generation_backend": backend,
               "experts_format": model_loader.experts_format_of(trainer.model),
               "processes": processes.num_processes,
               "prompts_per_step": processes.num_processes * settings["PROMPTS_PER_STEP"],
               "completions_per_step": completions_per_step, "steps_done": trainer.state.global_step,
               "steps_this_process": steps_done(), "resumed_from": checkpoint[1].name if checkpoint else None,
               "train_seconds": train_seconds, "training": summarize_log(trainer.state.log_history),
               "speed": speed, "kept": None}
    if plan:
        summary["planned_gpu_memory_gib"] = {phase: round(gib, 2) for phase, gib in plan.peaks_gib().items()}
        summary["memory_plan"] = {"parts_gib": {part: round(gib, 3) for part, gib in plan.parts.items()},
                                  "update_tokens": plan.update_tokens, "evaluation_rows": plan.evaluation_rows,
                                  "micro_batches": [settings["TRAIN_BATCH_SIZE"], settings["GRADIENT_ACCUMULATION"]]}
    stage = "saving the final adapter"
    try:
        with interrupts.deferred_interrupts("the final adapter is saved"):  # never half a final adapter
            if scorer and scorer.history:
                summary["kept"] = best_checkpoint.keep_best_adapter(trainer.model, scorer, out, log)
            run_directory.save_final_atomically(trainer, tokenizer, out,
                                                model_loader.portable_model_id(settings["MODEL_ID"]))
        if settings["EVAL_SAMPLES"] > 0:
            stage = "the final evaluation"
            with phases.phase("evaluation"):
                summary["held_out"] = evaluate_held_out(trainer.model, tokenizer, held_out, settings["EVAL_SAMPLES"],
                                                        settings["MAX_COMPLETION_LEN"], settings["SEED"], generator,
                                                        log, max_prompts=settings["EVAL_MAX_PROMPTS"],
                                                        batch_size=evaluation_rows)
    except KeyboardInterrupt:
        summary["held_out_interrupted"] = settings["EVAL_SAMPLES"] > 0
        if plan:
            summary["gpu_memory_gib"] = phases.gib()
        with interrupts.deferred_interrupts("the summary is written", then_stop=False):
            write_summary(out, summary)
        held_out = (" without the held-out evaluation; evaluate the adapter with: python test_lora_adapter.py "
                    f"--adapter-path {out}") if settings["EVAL_SAMPLES"] > 0 else ""
        raise SystemExit(f"\ninterrupted during {stage}: the adapter is saved in {out} and summary.md written"
                         + held_out) from None
    if plan:
        summary["gpu_memory_gib"] = phases.gib()
    with interrupts.deferred_interrupts("the summary is written", then_stop=False):  # the run ends here anyway
        write_summary(out, summary)
    print(render_summary(summary))


def make_settings_record(settings, out, main_process):
    """A TrainerCallback that writes the run's settings into OUT/run_config.json (the main process) when training
    begins, once a resumed run's checkpoint has loaded (a resume that fails leaves the run's settings as they were);
    `write()` writes them at once (a new run: the file marks the directory as a run)."""
    from transformers import TrainerCallback

    from training import run_directory

    class SettingsRecord(TrainerCallback):
        def write(self):
            if main_process:
                Path(out).mkdir(parents=True, exist_ok=True)
                write_text_atomically(json.dumps(settings, indent=2) + "\n", Path(out) / run_directory.RUN_CONFIG)

        def on_train_begin(self, args, state, control, **kwargs):
            self.write()

    return SettingsRecord()


if __name__ == "__main__":
    main()
