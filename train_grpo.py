"""Fine-tune gpt-oss with GRPO and LoRA to choose thermal-storage actions whose Q-values are best.

    python train_grpo.py --tiny                          # the main job on any machine: embedded stand-in, CPU, < 10 min
    python train_grpo.py                                 # openai/gpt-oss-20b on one 80 GB GPU
    python train_grpo.py --total-steps 50 --out runs/my-run --learning-rate 2e-5
    python train_grpo.py --resume --out runs/my-run      # continue a killed or stopped run at its last checkpoint
    accelerate launch --config_file accelerate_2gpu.yaml train_grpo.py   # 2 GPUs of one host (README: 4, 8, hosts)
    torchrun --standalone --nproc_per_node 2 train_grpo.py --tiny        # 2 CPU processes (gloo), as the tests do

Every constant below can be overridden from the command line (`TOTAL_STEPS` -> `--total-steps`); `--tiny` swaps
in the embedded stand-in (tiny_gpt_oss.py) and the CPU-sized settings of TINY_SETTINGS, under any flags you give.

What it does, in order:
1. checks every setting and validates the data files (data_reward.validate_data_files) before any model is loaded:
   every problem is listed as file:row, and the prompts must be Harmony (run convert_to_harmony.py first);
2. loads MODEL_ID through model_loader (MXFP4 experts dequantised to bf16 on GPU / fp32 on CPU, eager attention)
   and wraps it with a PEFT LoRA adapter (`all-linear` = attention q/k/v/o on gpt-oss; LORA_EXPERTS adds the
   experts' gate_up_proj/down_proj through `target_parameters`);
3. feeds TRL's GRPOTrainer from StepStream (step_stream.py) with two rewards (data_reward.py): the Boltzmann
   reward of the action in the final Harmony message (None when invalid) and a format penalty for invalid answers;
   the completions come from GENERATION_BACKEND: on a GPU by default the engine of rollout_engine.py (CUDA graphs,
   plugged in as TRL's rollout_func), else TRL's own `generate` or transformers' continuous batching; on a CPU the
   loss scores the completions through completion_scoring.py (each prompt's forward once for its whole group);
4. writes into OUT, once the model is loaded and wrapped (nothing before): the adapter and tokenizer, checkpoints
   every SAVE_STEPS (adapter, optimiser, trainer state; each complete or absent, see run_directory.py),
   run_config.json (the resolved settings), TensorBoard logs (runs/<run>/logs; `tensorboard --logdir runs`),
   completions.csv (every scored completion, steps counted from 1, see data_reward.CompletionLog),
   validation.json (each checkpoint's score on VALIDATION_PROMPTS training prompts) and summary.json / summary.md.
   The run's adapter is the best-scoring checkpoint's (best_checkpoint.py), not necessarily the last step's; it
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

import json
import math
import os
import time
from pathlib import Path

import best_checkpoint
import run_directory
import script_settings

ROOT = Path(__file__).resolve().parent
# -----------------------------------------------------------------------------
# Model and data
MODEL_ID = "openai/gpt-oss-20b"  # Hub id, local model directory, or 'tiny' (the embedded stand-in)
EXPERTS_FORMAT = "bf16"  # bf16: experts dequantised on load (needs an 80 GB card at 20b); mxfp4: kept as stored,
                         #   multiplied by mxfp4_experts.py's kernels (~13 GiB of weights: a 24 GB card; attention
                         #   LoRA only)
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
TRAIN_BATCH_SIZE = 16  # completions per forward/backward micro-batch (16 x 2 updated in 2.3 s a step vs 2.5 s for
                       #   8 x 4 at +2 GiB peak: benchmarks/RESULTS.md)
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
GENERATION_BACKEND = "auto"  # engine (rollout_engine.py, CUDA graphs) | continuous-batching | generate; auto: engine on a GPU, generate on a CPU
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
                                  #   tested), in 0.12 s a step instead of 0.18
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
    at_least = {"NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 1, "TRAIN_BATCH_SIZE": 1, "GRADIENT_ACCUMULATION": 1,
                "MAX_PROMPT_LEN": 1, "MAX_COMPLETION_LEN": 1, "TOTAL_STEPS": 1, "SAVE_STEPS": 1, "LORA_RANK": 1,
                "EVAL_SAMPLES": 0, "EVAL_MAX_PROMPTS": 0, "SEED": 0, "WARMUP_STEPS": 0,
                "VALIDATION_PROMPTS": 0, "VALIDATION_SAMPLES": 1}
    for name, least in at_least.items():
        if s[name] < least:
            why = " (GRPO compares completions within a group)" if name == "NUM_GENERATIONS" else ""
            raise SystemExit(f"error: --{flag(name)} must be at least {least}{why}, got {s[name]}")
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
    from harmony import REASONING_EFFORTS

    if s["REASONING_EFFORT"] not in REASONING_EFFORTS:
        raise SystemExit(f"error: --reasoning-effort {s['REASONING_EFFORT']!r} is not one of "
                         f"{', '.join(REASONING_EFFORTS)}")
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
    if s["EXPERTS_FORMAT"] == "mxfp4" and s["LORA_EXPERTS"]:
        raise SystemExit("error: --lora-experts true needs --experts-format bf16: an expert adapter on MXFP4-resident "
                         "experts is not supported yet (attention LoRA is)")
    if not (math.isfinite(s["MAX_GPU_MEMORY_GIB"]) and s["MAX_GPU_MEMORY_GIB"] >= 0):
        raise SystemExit(f"error: --max-gpu-memory-gib must be 0 (no cap) or a number of GiB, got "
                         f"{s['MAX_GPU_MEMORY_GIB']}")
    if s["GENERATION_BACKEND"] not in ("auto", *GENERATION_BACKENDS):
        raise SystemExit(f"error: GENERATION_BACKEND {s['GENERATION_BACKEND']!r} is not one of auto, "
                         f"{', '.join(GENERATION_BACKENDS)}")


GENERATION_BACKENDS = ("engine", "continuous-batching", "generate")
EXPERTS_FORMATS = ("bf16", "mxfp4")  # model_loader.EXPERTS_FORMATS, named here so that settings are checked before
                                     #   torch is imported
# Said whenever generation runs out of memory: the settings that shrink it, most effective first.
MEMORY_ADVICE = (
    "Reduce memory with --train-batch-size (and raise --gradient-accumulation to keep the batch), "
    "--max-completion-len, --num-generations, --prompts-per-step or --lora-rank, keep --gradient-checkpointing "
    "true, and use --generation-backend engine (it holds only a static KV cache of the step's size) or generate."
)


def resolve_backend(backend, device):
    """'auto' -> the engine on a GPU, TRL's generate on a CPU; continuous batching needs a GPU."""
    if backend == "auto":
        return "engine" if device == "cuda" else "generate"
    if backend == "continuous-batching" and device != "cuda":
        raise SystemExit("error: --generation-backend continuous-batching needs a CUDA GPU; use generate or engine")
    return backend


def continuous_batching_config(settings):
    """transformers' continuous batching sized to one step's work instead of a share of free GPU memory.

    Its default takes 90 % of the memory left after loading for the KV cache and lets a prefill batch grow until
    the full-vocabulary logits alone ask for 16 GiB: at real prompt lengths on an 80 GB card that runs out of memory.
    Here: enough 256-token blocks for every completion of a step at the longest prompt, and prefill batches of at
    most 2,048 tokens (1.6 GiB of fp32 logits).
    """
    block = 256
    rows = settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    blocks_per_row = math.ceil((settings["MAX_PROMPT_LEN"] + settings["MAX_COMPLETION_LEN"]) / block)
    return {"block_size": block, "num_blocks": rows * blocks_per_row + 8, "max_batch_tokens": 2048}


def flag(name):
    return name.lower().replace("_", "-")


def check_report_to(report_to):
    """REPORT_TO: 'none', or comma-separated trackers that transformers knows and that are installed."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    for name in report_trackers(report_to):
        if name not in INTEGRATION_TO_CALLBACK:
            raise SystemExit(f"error: --report-to {name!r} is not a tracker transformers knows; use none or one of "
                             f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in get_available_reporting_integrations():
            raise SystemExit(f"error: --report-to {name}: its package is not installed (pip install {name}); or "
                             "use --report-to tensorboard or none")


def report_trackers(report_to):
    return [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]


def read_data(settings):
    """Validated data frames of the training and held-out splits (exits with file:row messages on bad data)."""
    import harmony
    from data_reward import DataError, validate_data_files

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


def lora_config(settings):
    from peft import LoraConfig

    targets = settings["LORA_TARGETS"]
    return LoraConfig(
        r=settings["LORA_RANK"],
        lora_alpha=settings["LORA_ALPHA"],
        lora_dropout=0.0,  # must be 0 for target_parameters (expert LoRA)
        target_modules=targets if targets == "all-linear" else targets.split(","),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if settings["LORA_EXPERTS"] else None,
        task_type="CAUSAL_LM",
    )


def grpo_config(settings, device, backend):
    import dataclasses

    from trl import GRPOConfig

    from data_reward import reward_weights

    checkpointing = {"gradient_checkpointing": settings["GRADIENT_CHECKPOINTING"]}
    if "activation_checkpointing" in {field.name for field in dataclasses.fields(GRPOConfig)}:
        # transformers >= 5.2x renamed it; the old name alone warns (5.17, on the GPU image, has only the old one)
        checkpointing["activation_checkpointing"] = settings["GRADIENT_CHECKPOINTING"]
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
        use_transformers_continuous_batching=backend == "continuous-batching",
        transformers_continuous_batching_config=(continuous_batching_config(settings)
                                                 if backend == "continuous-batching" else None),
        loss_type=settings["LOSS_TYPE"],
        beta=settings["BETA"],
        top_entropy_quantile=settings["TOP_ENTROPY_QUANTILE"],
        reward_weights=reward_weights(),
        shuffle_dataset=False,  # StepStream already orders prompts (no repeats, fair across files)
        **checkpointing,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to=report_trackers(settings["REPORT_TO"]),
        seed=settings["SEED"],
        data_seed=settings["SEED"],
        log_completions=False,  # completions.csv holds them, with the Harmony markers kept
        save_only_model=False,
        dataloader_num_workers=0,
    )


def mean_of(logs, key):
    """Mean of `key` over trainer log rows that hold a number for it (NaN and None left out); None if none do."""
    values = [log[key] for log in logs if isinstance(log.get(key), (int, float)) and not math.isnan(log[key])]
    return sum(values) / len(values) if values else None


def make_progress_printer(total_steps, every):
    """A TrainerCallback that prints one compact line every `every` steps (the full metrics go to TensorBoard), in the
    main process."""
    from transformers import TrainerCallback

    from data_reward import reward_metric

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


def summarize_speed(log_history, device, first_step=0, completions_per_step=None):
    """Seconds per step (generation and the rest), generated tokens per second, completions per second, peak GPU
    memory (of the fullest card; every card's too when there are several).

    Only steps after `first_step` count: a resumed run's history holds the steps of earlier starts too. With several
    processes the generation figures are one process's (TRL averages them over the processes), and every process
    must call this (the peaks are gathered).
    """
    import torch
    from accelerate.utils import gather_object

    rows = [r for r in log_history if "step_time" in r and r.get("step", 0) > first_step]
    step, generation, tokens = (mean_of(rows, key) for key in
                                ("step_time", "timing/generation_seconds", "timing/generated_tokens"))
    speed = {"seconds_per_step": step, "generation_seconds_per_step": generation,
             "update_seconds_per_step": step - generation if step is not None and generation is not None else None,
             "generated_tokens_per_second": tokens / generation if tokens and generation else None,
             "completions_per_second": completions_per_step / step if completions_per_step and step else None}
    if device == "cuda":
        peaks = gather_object([torch.cuda.max_memory_allocated() / 2**30])  # one per process, in process order
        speed["peak_gpu_memory_gib"] = max(peaks)
        if len(peaks) > 1:
            speed["peak_gpu_memory_gib_per_process"] = peaks
    return speed


def summarize_log(log_history):
    """Reward, valid rate and accuracy at the start and end of training, from the trainer's log history."""
    from data_reward import reward_metric

    rows = [r for r in log_history if reward_metric() in r or "train/valid_rate" in r]
    def window(part):
        keys = {"reward": reward_metric(), "valid_rate": "valid_rate", "accuracy": "accuracy"}
        return {label: mean_of(part, key) for label, key in keys.items()}
    k = max(1, min(10, len(rows) // 5))
    return {"steps": len(rows), "first_steps": window(rows[:k]), "last_steps": window(rows[-k:]), "window": k}


def write_summary(out, summary):
    """summary.json for programs, summary.md for people."""
    from data_reward import strict_json, write_text_atomically

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
    steps += f" (generation: {summary.get('generation_backend', 'n/a')})."
    if "processes" in summary:
        processes, prompts = summary["processes"], summary["prompts_per_step"]
        steps += f" {describe_batch(processes, prompts // processes, summary['completions_per_step'] // prompts)}."
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


def keep_best_adapter(model, scorer, out, log):
    """Load the best-scoring checkpoint's adapter into the model when it is not the last step's; what was kept."""
    kept, reason = best_checkpoint.choose_kept(scorer.history)
    last = scorer.history[-1]
    if kept["step"] != last["step"]:
        best_checkpoint.load_checkpoint_adapter(model, out / f"checkpoint-{kept['step']}")
        log(f"kept the adapter of step {kept['step']}: {reason}; the last one stays in checkpoint-{last['step']}")
    return {"step": kept["step"], "reason": reason, "kept_scores": kept, "last_scores": last,
            "validation_prompts": len(scorer.frame), "validation_samples": scorer.samples}


def evaluate_held_out(model, tokenizer, held_out, settings, backend, log):
    """Untrained (adapter disabled) and trained policy on the held-out split, same prompts and seeds."""
    import pandas as pd

    from evaluation import evaluate_model, paired_gain, reference_scores

    frame = pd.concat(list(held_out.values()), ignore_index=True)
    if settings["EVAL_MAX_PROMPTS"]:
        frame = frame.iloc[: settings["EVAL_MAX_PROMPTS"]]
    kwargs = dict(samples=settings["EVAL_SAMPLES"], temperature=1.0, max_new_tokens=settings["MAX_COMPLETION_LEN"],
                  seed=settings["SEED"], backend="engine" if backend == "engine" else "generate", log=log)
    log(f"held-out evaluation: {len(frame)} prompts x {settings['EVAL_SAMPLES']} answers, untrained policy")
    with model.disable_adapter():
        untrained, _, untrained_actions = evaluate_model(model, tokenizer, frame, **kwargs)
    log("held-out evaluation: trained policy")
    trained, _, trained_actions = evaluate_model(model, tokenizer, frame, **kwargs)
    return {"prompts": len(frame), "samples": settings["EVAL_SAMPLES"], "temperature": 1.0,
            "untrained": untrained, "trained": trained, "references": reference_scores(frame),
            "gain": paired_gain(frame, untrained_actions, trained_actions, seed=settings["SEED"])}


def load_for_training(settings, train_frames, device, log):
    """(LoRA-wrapped model, tokenizer, prompt pool): everything that can fail on the settings, before any write."""
    import model_loader
    from step_stream import make_pool

    try:
        model_loader.load_config(model_loader.resolve_model_id(settings["MODEL_ID"]))  # a bad model id fails here
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
        start = time.time()
        if device == "cuda" and settings["MAX_GPU_MEMORY_GIB"]:
            cap_gpu_memory(settings["MAX_GPU_MEMORY_GIB"], log)
        model = model_loader.load_model(settings["MODEL_ID"], device=device, experts_format=settings["EXPERTS_FORMAT"],
                                        headroom_gib=model_loader.TRAINING_HEADROOM_GIB if device == "cuda" else 0)
        log(f"model loaded in {time.time() - start:.0f} s")
    except model_loader.ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None

    from peft import get_peft_model

    check_lora_targets(model, settings["LORA_TARGETS"])
    model = get_peft_model(model, lora_config(settings))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA: {trainable:,} trainable parameters")
    return model, tokenizer, pool


def cap_gpu_memory(gib, log):
    """Let this process allocate at most `gib` GiB of the GPU, as if the card had no more."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    log(f"GPU memory capped at {gib:g} GiB of {total / 2**30:.0f}")


def check_lora_targets(model, targets):
    """Every name in LORA_TARGETS must name modules of the model (PEFT only complains when none does)."""
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets.split(",") if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SystemExit(f"error: --lora-targets: {', '.join(unknown)} names no module of {model.config.model_type}; "
                         f"its linear layers are {', '.join(linear)}: name some of them (comma-separated), or use "
                         "all-linear")


def make_trainer(model, tokenizer, pool, completion_log, settings, device, backend, log, callbacks=()):
    import model_loader
    from data_reward import make_reward_functions
    from grpo_trainer import TesGRPOTrainer
    from step_stream import StepStream

    stream = StepStream(pool, seed=settings["SEED"])
    rollout_func = None
    if backend == "engine":
        from rollout_engine import make_rollout_func

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.x
        rollout_func = make_rollout_func(tokenizer)
    log(f"generation: {backend}")
    trainer = TesGRPOTrainer(
        model=model,
        reward_funcs=make_reward_functions(tokenizer, settings["FORMAT_PENALTY"], completion_log),
        args=grpo_config(settings, device, backend),
        train_dataset=stream.as_dataset(),
        processing_class=tokenizer,
        rollout_func=rollout_func,
        callbacks=[make_progress_printer(settings["TOTAL_STEPS"], max(1, settings["TOTAL_STEPS"] // 20)),
                   *callbacks],
        generation_backend=backend,
        # saved adapters name a base that another checkout finds again
        base_model_id=model_loader.portable_model_id(settings["MODEL_ID"]),
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)  # one compact line per PROGRESS window instead of a dict per step
    trainer.remove_callback(PrinterCallback)
    return trainer


def main(argv=None):
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    processes = start_processes()
    try:
        train(args, processes)
    except SystemExit as stop:
        if processes.is_main_process or not isinstance(stop.code, str):
            raise
        raise SystemExit(1) from None  # the main process says why; the others stop without saying it again
    processes.destroy_process_group()  # NCCL warns at exit otherwise; nothing to do with one process


def stop_on_sigterm():
    """SIGTERM (what `kill` and job schedulers send before SIGKILL) stops a run as Ctrl-C does: a checkpoint and the
    command that resumes, instead of an exit that loses the steps since the last checkpoint."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, interrupt)


def start_processes():
    """accelerate's state of this process: the only one under `python`, one of several under a launcher.

    Under `accelerate launch` (or torchrun) it joins the others: NCCL on GPUs, each process bound to its own GPU;
    gloo on CPUs, which accelerate takes as one distributed run only when told cpu=True.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def describe_batch(processes, prompts_per_step, generations):
    """'2 processes x 4 prompts x 8 answers = 64 completions per step': PROMPTS_PER_STEP counts per process."""
    return (f"{processes} process{'es' if processes > 1 else ''} x {prompts_per_step} prompts x {generations} answers "
            f"= {processes * prompts_per_step * generations} completions per step")


def resume_command(out, processes):
    """The command that continues the run in `out` with the same number of processes."""
    launch = "python" if processes == 1 else f"accelerate launch --num_processes {processes}"
    return f"{launch} train_grpo.py --resume --out {out}"


def train(args, processes):
    """The run, in every process: the main one alone prints and writes what is not a checkpoint part (see README)."""
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
        finished = run_directory.finished_message(out, start_step, settings["TOTAL_STEPS"]) if checkpoint else None
        if finished:
            log(finished)
            return
        train_frames, held_out = read_data(settings)  # before any model is loaded

        import torch

        import grpo_trainer
        import model_loader
        from data_reward import CompletionLog, write_text_atomically

        device = "cuda" if processes.device.type == "cuda" else "cpu"  # model_loader.pick_device, as accelerate chose
        backend = resolve_backend(settings["GENERATION_BACKEND"], device)
        torch.manual_seed(settings["SEED"])
        model, tokenizer, pool = load_for_training(settings, train_frames, device, log)
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
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(json.dumps(settings, indent=2) + "\n", out / run_directory.RUN_CONFIG)
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
                settings, backend, out, best_checkpoint.read_history(out, start_step) if checkpoint else [], log)
        trainer = make_trainer(model, tokenizer, pool, completion_log, settings, device, backend, log,
                               [scorer] if scorer else [])
        start = time.time()
        trainer.train(resume_from_checkpoint=str(checkpoint[1]) if checkpoint else None)
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
            trainer.save_checkpoint_now()
        raise SystemExit(f"\ninterrupted at step {trainer.state.global_step}: checkpoint saved in {out}; "
                         f"continue with: {resume_command(out, processes.num_processes)}") from None
    except torch.OutOfMemoryError:
        forget_if_nothing_done()
        raise SystemExit(f"error: the GPU ran out of memory (generation backend: {backend}). {MEMORY_ADVICE}") from None
    except grpo_trainer.GenerationFailed as error:
        forget_if_nothing_done()
        raise SystemExit(f"error: {error}. {MEMORY_ADVICE}") from None
    except BaseException:
        forget_if_nothing_done()
        raise
    train_seconds = time.time() - start
    completions_per_step = processes.num_processes * settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    speed = summarize_speed(trainer.state.log_history, device, start_step, completions_per_step)
    if not main_process:
        return  # the main process keeps the adapter, evaluates it and writes the summary
    kept = keep_best_adapter(trainer.model, scorer, out, log) if scorer and scorer.history else None
    run_directory.save_final_atomically(trainer, tokenizer, out, model_loader.portable_model_id(settings["MODEL_ID"]))

    summary = {"out": str(out), "device": device_name(device), "generation_backend": backend,
               "processes": processes.num_processes,
               "prompts_per_step": processes.num_processes * settings["PROMPTS_PER_STEP"],
               "completions_per_step": completions_per_step, "steps_done": trainer.state.global_step,
               "steps_this_process": steps_done(), "resumed_from": checkpoint[1].name if checkpoint else None,
               "train_seconds": train_seconds, "training": summarize_log(trainer.state.log_history),
               "speed": speed, "kept": kept}
    if settings["EVAL_SAMPLES"] > 0:
        try:
            summary["held_out"] = evaluate_held_out(trainer.model, tokenizer, held_out, settings, backend, log)
        except KeyboardInterrupt:
            summary["held_out_interrupted"] = True
            write_summary(out, summary)
            raise SystemExit(f"\ninterrupted during the final evaluation: the adapter is saved in {out} and "
                             "summary.md written without the held-out evaluation; evaluate the adapter with: "
                             f"python test_lora_adapter.py --adapter-path {out}") from None
    write_summary(out, summary)
    print(render_summary(summary))


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
