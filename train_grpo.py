"""Fine-tune gpt-oss with GRPO and LoRA to choose thermal-storage actions whose Q-values are best.

    python train_grpo.py --tiny                          # the main job on any machine: embedded stand-in, CPU, < 10 min
    python train_grpo.py                                 # openai/gpt-oss-20b on one 80 GB GPU
    python train_grpo.py --total-steps 50 --out runs/my-run --learning-rate 2e-5
    python train_grpo.py --resume --out runs/my-run      # continue a killed or stopped run at its last checkpoint

Every constant below can be overridden from the command line (`TOTAL_STEPS` -> `--total-steps`); `--tiny` swaps
in the embedded stand-in (tiny_gpt_oss.py) and the CPU-sized settings of TINY_SETTINGS, under any flags you give.

What it does, in order:
1. validates the data files (data_reward.validate_data_files) before any model is loaded: every problem is listed
   as file:row, and the prompts must be Harmony (run convert_to_harmony.py first);
2. loads MODEL_ID through model_loader (MXFP4 experts dequantised to bf16 on GPU / fp32 on CPU, eager attention)
   and wraps it with a PEFT LoRA adapter (`all-linear` = attention q/k/v/o on gpt-oss; LORA_EXPERTS adds the
   experts' gate_up_proj/down_proj through `target_parameters`);
3. feeds TRL's GRPOTrainer from StepStream (step_stream.py) with two rewards (data_reward.py): the Boltzmann
   reward of the action in the final Harmony message (None when invalid) and a format penalty for invalid answers;
4. writes into OUT: the adapter and tokenizer, checkpoints every SAVE_STEPS (adapter, optimiser, trainer state),
   run_config.json (the resolved settings), TensorBoard logs (runs/<run>/logs; `tensorboard --logdir runs`),
   completions.csv (every scored completion, see data_reward.CompletionLog) and summary.json / summary.md.
At the end it evaluates the untrained and the trained policy on the held-out split (EVAL_SAMPLES answers per
prompt at temperature 1) beside uniform guessing, the best constant action and the optimal policy.

Deviations from textbook GRPO (TRL 1.x defaults unless set here): DAPO loss (token-level normalisation),
no KL term (beta = 0), one optimiser step per generation batch (on-policy; steps_per_generation = gradient
accumulation), no prompt truncation (over-long prompts are left out of the stream and reported).
"""

import json
import math
import os
import time
from pathlib import Path

import script_settings

ROOT = Path(__file__).resolve().parent
# -----------------------------------------------------------------------------
# Model and data
MODEL_ID = "openai/gpt-oss-20b"  # Hub id, local model directory, or 'tiny' (the embedded stand-in)
DATA_FILES = ["data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"]  # Harmony CSVs with rewards
TRAIN_SPLIT = "train"  # rows of this `split` train
EVAL_SPLIT = "eval"  # rows of this `split` are held out for the final evaluation
OUT = "runs/grpo-gpt-oss-20b"  # run directory: adapter, checkpoints, logs, summary
# GRPO batch: PROMPTS_PER_STEP * NUM_GENERATIONS completions per optimiser step,
# processed TRAIN_BATCH_SIZE at a time over GRADIENT_ACCUMULATION micro-batches
NUM_GENERATIONS = 8  # completions per prompt (one GRPO group)
PROMPTS_PER_STEP = 4  # prompts (groups) per optimiser step
TRAIN_BATCH_SIZE = 8  # completions per forward/backward micro-batch
GRADIENT_ACCUMULATION = 4  # micro-batches per optimiser step (= PROMPTS_PER_STEP * NUM_GENERATIONS / TRAIN_BATCH_SIZE)
MAX_PROMPT_LEN = 1024  # prompts longer than this (in tokens) are left out and reported
MAX_COMPLETION_LEN = 256  # tokens a completion may use before it counts as truncated (invalid)
# Optimisation
TOTAL_STEPS = 200  # optimiser steps
SAVE_STEPS = 25  # checkpoint every this many steps
LEARNING_RATE = 1e-5  # AdamW learning rate of the LoRA weights
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
CONTINUOUS_BATCHING = True  # generate with transformers' continuous batching (GPU; ~1.8x faster than generate())
# Evaluation and logging
EVAL_SAMPLES = 0  # answers per held-out prompt in the final before/after evaluation (0 = skip)
EVAL_MAX_PROMPTS = 0  # held-out prompts evaluated (0 = all)
REPORT_TO = "tensorboard"  # TRL/transformers trackers: tensorboard | wandb | trackio | none
SEED = 42  # seeds the stream, the sampling and the adapter's initialisation
# The main job on a CPU: the embedded stand-in with settings sized for 2 cores and < 10 minutes
TINY_SETTINGS = dict(
    MODEL_ID="tiny",
    OUT="runs/grpo-tiny",
    NUM_GENERATIONS=8,
    PROMPTS_PER_STEP=4,
    TRAIN_BATCH_SIZE=32,
    GRADIENT_ACCUMULATION=1,
    MAX_COMPLETION_LEN=64,
    TOTAL_STEPS=800,
    SAVE_STEPS=100,
    LEARNING_RATE=2e-3,
    BETA=0.05,  # a little KL to the untrained stand-in keeps its Harmony format while the LoRA learns
    GRADIENT_CHECKPOINTING=False,
    CONTINUOUS_BATCHING=False,
    EVAL_SAMPLES=4,
)
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper() and name not in ("ROOT", "TINY_SETTINGS")]


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


def resolve_settings(args):
    """Constants, then TINY_SETTINGS when --tiny, then explicit flags."""
    settings = {name: globals()[name] for name in SETTINGS}
    if args.tiny:
        settings.update(TINY_SETTINGS)
    return script_settings.apply_flags(args, settings)


def check_settings(s):
    """Inconsistent batch settings -> one message naming them."""
    completions = s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    if s["NUM_GENERATIONS"] < 2:
        raise SystemExit("error: NUM_GENERATIONS must be at least 2: GRPO compares completions within a group")
    if completions != s["TRAIN_BATCH_SIZE"] * s["GRADIENT_ACCUMULATION"]:
        raise SystemExit(
            f"error: PROMPTS_PER_STEP * NUM_GENERATIONS = {completions} completions per step, but TRAIN_BATCH_SIZE * "
            f"GRADIENT_ACCUMULATION = {s['TRAIN_BATCH_SIZE'] * s['GRADIENT_ACCUMULATION']}: make them equal "
            f"(e.g. --gradient-accumulation {max(1, completions // s['TRAIN_BATCH_SIZE'])} if that divides evenly)"
        )
    if s["TRAIN_BATCH_SIZE"] % s["NUM_GENERATIONS"] and s["NUM_GENERATIONS"] % s["TRAIN_BATCH_SIZE"]:
        raise SystemExit("error: TRAIN_BATCH_SIZE and NUM_GENERATIONS must divide one another")


def find_last_checkpoint(out):
    checkpoints = sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def check_run_dir(out, resume):
    """A run directory is never overwritten: continue it with --resume or pick another --out."""
    out = Path(out)
    run_files = ("run_config.json", "adapter_config.json", "completions.csv")
    holds_run = any((out / name).exists() for name in run_files) or find_last_checkpoint(out) is not None
    if resume and find_last_checkpoint(out) is None:
        raise SystemExit(f"error: --resume: {out} has no checkpoint-* directory to continue from")
    if holds_run and not resume:
        raise SystemExit(f"error: {out} already holds a run; continue it with --resume, or choose another --out")


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
    return train, held_out


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


def grpo_config(settings, device):
    from trl import GRPOConfig

    out = settings["OUT"]
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(out) / "logs"))  # transformers 5 has no logging_dir
    return GRPOConfig(
        output_dir=out,
        max_steps=settings["TOTAL_STEPS"],
        save_steps=settings["SAVE_STEPS"],
        save_strategy="steps",
        logging_steps=1,
        learning_rate=settings["LEARNING_RATE"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=settings["TRAIN_BATCH_SIZE"],
        gradient_accumulation_steps=settings["GRADIENT_ACCUMULATION"],
        steps_per_generation=settings["GRADIENT_ACCUMULATION"],
        num_generations=settings["NUM_GENERATIONS"],
        max_completion_length=settings["MAX_COMPLETION_LEN"],
        temperature=settings["TEMPERATURE"],
        top_p=settings["TOP_P"],
        use_transformers_continuous_batching=settings["CONTINUOUS_BATCHING"] and device == "cuda",
        loss_type=settings["LOSS_TYPE"],
        beta=settings["BETA"],
        top_entropy_quantile=settings["TOP_ENTROPY_QUANTILE"],
        reward_weights=[1.0, 1.0],
        shuffle_dataset=False,  # StepStream already orders prompts (no repeats, fair across files)
        gradient_checkpointing=settings["GRADIENT_CHECKPOINTING"],
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to=[] if settings["REPORT_TO"] in ("none", "") else [settings["REPORT_TO"]],
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
    """A TrainerCallback that prints one compact line every `every` steps (the full metrics go to TensorBoard)."""
    from transformers import TrainerCallback

    class ProgressPrinter(TrainerCallback):
        def __init__(self):
            self.start, self.window = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.window.append(logs)
            if state.global_step % every and state.global_step != total_steps or not self.window:
                return
            def mean(key):
                value = mean_of(self.window, key)
                return float("nan") if value is None else value

            done = state.global_step - self.first_step
            per_step = (time.time() - self.start) / max(done, 1)
            print(f"step {state.global_step:5d}/{total_steps}  reward {mean('rewards/action_reward/mean'):.3f}  "
                  f"valid {mean('valid_rate'):.3f}  accuracy {mean('accuracy'):.3f}  "
                  f"{per_step:.2f} s/step  eta {per_step * (total_steps - state.global_step) / 60:.1f} min",
                  flush=True)
            self.window = []

    return ProgressPrinter()


def time_generation(trainer):
    """Log each step's generation seconds and generated tokens (TRL times generation for wandb only).

    Wraps the trainer's `_generate`; if a TRL release renames it, training runs on without these two figures.
    """
    original = getattr(trainer, "_generate", None)
    if original is None:
        return

    def timed(prompts, *args, **kwargs):
        start = time.perf_counter()
        result = original(prompts, *args, **kwargs)
        trainer._log_metric("timing/generation_seconds", time.perf_counter() - start)
        trainer._log_metric("timing/generated_tokens", float(sum(len(ids) for ids in result[1])))
        return result

    trainer._generate = timed


def summarize_speed(log_history, device):
    """Seconds per step (generation and the rest), generated tokens per second, peak GPU memory."""
    import torch

    rows = [r for r in log_history if "step_time" in r]
    step, generation, tokens = (mean_of(rows, key) for key in
                                ("step_time", "timing/generation_seconds", "timing/generated_tokens"))
    speed = {"seconds_per_step": step, "generation_seconds_per_step": generation,
             "update_seconds_per_step": step - generation if step is not None and generation is not None else None,
             "generated_tokens_per_second": tokens / generation if tokens and generation else None}
    if device == "cuda":
        speed["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return speed


def summarize_log(log_history):
    """Reward, valid rate and accuracy at the start and end of training, from the trainer's log history."""
    rows = [r for r in log_history if "rewards/action_reward/mean" in r or "train/valid_rate" in r]
    def window(part):
        keys = {"reward": "rewards/action_reward/mean", "valid_rate": "valid_rate", "accuracy": "accuracy"}
        return {label: mean_of(part, key) for label, key in keys.items()}
    k = max(1, min(10, len(rows) // 5))
    return {"steps": len(rows), "first_steps": window(rows[:k]), "last_steps": window(rows[-k:]), "window": k}


def write_summary(out, summary):
    """summary.json for programs, summary.md for people."""
    from data_reward import write_text_atomically

    write_text_atomically(json.dumps(summary, indent=2) + "\n", Path(out) / "summary.json")
    write_text_atomically(render_summary(summary), Path(out) / "summary.md")


def render_summary(summary):
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    t = summary["training"]
    out = Path(summary["out"])
    lines = [f"# GRPO run {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", "",
             f"{summary['steps_done']} steps in {summary['train_seconds']:.0f} s on {summary['device']}.", "",
             render_speed(summary["speed"]), "",
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
        lines += ["", f"Gain over the untrained policy: {h['trained']['mean_reward'] - h['untrained']['mean_reward']:+.3f} "
                  "mean reward."]
    return "\n".join(lines) + "\n"


def render_speed(speed):
    def fmt(x, unit):
        return "n/a" if x is None else f"{x:.2f} {unit}"
    line = (f"Per step: {fmt(speed['seconds_per_step'], 's')} ({fmt(speed['generation_seconds_per_step'], 's')} "
            f"generation, {fmt(speed['update_seconds_per_step'], 's')} the rest); "
            f"{fmt(speed['generated_tokens_per_second'], 'generated tokens/s')}")
    if "peak_gpu_memory_gib" in speed:
        line += f"; peak GPU memory {speed['peak_gpu_memory_gib']:.1f} GiB"
    return line + "."


def evaluate_held_out(model, tokenizer, held_out, settings, log):
    """Untrained (adapter disabled) and trained policy on the held-out split, same prompts and seeds."""
    import pandas as pd

    from evaluation import evaluate_model, reference_scores

    frame = pd.concat(list(held_out.values()), ignore_index=True)
    if settings["EVAL_MAX_PROMPTS"]:
        frame = frame.iloc[: settings["EVAL_MAX_PROMPTS"]]
    kwargs = dict(samples=settings["EVAL_SAMPLES"], temperature=1.0, max_new_tokens=settings["MAX_COMPLETION_LEN"],
                  seed=settings["SEED"], log=log)
    log(f"held-out evaluation: {len(frame)} prompts x {settings['EVAL_SAMPLES']} answers, untrained policy")
    with model.disable_adapter():
        untrained, _, _ = evaluate_model(model, tokenizer, frame, **kwargs)
    log("held-out evaluation: trained policy")
    trained, _, _ = evaluate_model(model, tokenizer, frame, **kwargs)
    return {"prompts": len(frame), "samples": settings["EVAL_SAMPLES"], "temperature": 1.0,
            "untrained": untrained, "trained": trained, "references": reference_scores(frame)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    check_settings(settings)
    out = Path(settings["OUT"])
    if not out.is_absolute():
        out = ROOT / out
        settings["OUT"] = str(out)
    check_run_dir(out, args.resume)
    train_frames, held_out = read_data(settings)  # before any model is loaded

    import torch

    import model_loader
    from data_reward import CompletionLog, make_reward_functions
    from step_stream import StepStream, make_pool

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device = model_loader.pick_device()
    torch.manual_seed(settings["SEED"])
    try:
        tokenizer = model_loader.load_tokenizer(settings["MODEL_ID"])
        pool, too_long = make_pool(train_frames, tokenizer, settings["MAX_PROMPT_LEN"])
        if too_long:
            log(f"warning: {len(too_long)} prompts are longer than MAX_PROMPT_LEN={settings['MAX_PROMPT_LEN']} "
                f"tokens and are left out (first: {too_long[0]}); raise --max-prompt-len to keep them")
        log(f"{len(pool)} training prompts from {len(train_frames)} file(s); loading {settings['MODEL_ID']} on {device}")
        start = time.time()
        model = model_loader.load_model(settings["MODEL_ID"], device=device)
        log(f"model loaded in {time.time() - start:.0f} s")
    except model_loader.ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None

    from peft import get_peft_model
    from trl import GRPOTrainer

    out.mkdir(parents=True, exist_ok=True)
    model = get_peft_model(model, lora_config(settings))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA: {trainable:,} trainable parameters")
    settings["MODEL_PATH"] = model_loader.resolve_model_id(settings["MODEL_ID"])
    from data_reward import write_text_atomically

    write_text_atomically(json.dumps(settings, indent=2) + "\n", out / "run_config.json")

    completion_log = None
    if os.environ.get("GRPO_LOG_COMPLETIONS", "1") != "0":
        steps_per_generation = int(os.environ.get("GRPO_STEPS_PER_GENERATION", settings["GRADIENT_ACCUMULATION"]))
        completion_log = CompletionLog(os.environ.get("GRPO_COMPLETION_LOG_PATH", out / "completions.csv"),
                                       steps_per_generation)
    checkpoint = find_last_checkpoint(out) if args.resume else None
    if checkpoint is not None and completion_log is not None:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        dropped = completion_log.drop_rows_from(step)
        log(f"resuming from {checkpoint.name} (step {step}); dropped {dropped} completion-log rows of later steps")

    stream = StepStream(pool, seed=settings["SEED"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=make_reward_functions(tokenizer, settings["FORMAT_PENALTY"], completion_log),
        args=grpo_config(settings, device),
        train_dataset=stream.as_dataset(),
        processing_class=tokenizer,
        callbacks=[make_progress_printer(settings["TOTAL_STEPS"], max(1, settings["TOTAL_STEPS"] // 20))],
    )
    time_generation(trainer)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)  # one compact line per PROGRESS window instead of a dict per step
    trainer.remove_callback(PrinterCallback)
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        trainer._save_checkpoint(trainer.model, trial=None)
        raise SystemExit(f"\ninterrupted at step {trainer.state.global_step}: checkpoint saved in {out}; "
                         f"continue with: python train_grpo.py --resume --out {out}") from None
    except torch.OutOfMemoryError:
        raise SystemExit(
            "error: the GPU ran out of memory. Reduce memory with --train-batch-size (and raise "
            "--gradient-accumulation to keep the batch), --max-completion-len, --num-generations, "
            "--prompts-per-step or --lora-rank, set --continuous-batching false (it reserves more memory for "
            "generation), and keep --gradient-checkpointing true."
        ) from None
    train_seconds = time.time() - start
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    trainer.save_state()

    summary = {"out": str(out), "device": device_name(device), "steps_done": trainer.state.global_step,
               "train_seconds": train_seconds, "training": summarize_log(trainer.state.log_history),
               "speed": summarize_speed(trainer.state.log_history, device)}
    if settings["EVAL_SAMPLES"] > 0:
        summary["held_out"] = evaluate_held_out(trainer.model, tokenizer, held_out, settings, log)
    write_summary(out, summary)
    print(render_summary(summary))


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
