"""Evaluate a trained LoRA adapter against its base model: what test_lora_adapter*.py and the exporter share.

- runs and settings: `find_newest_run` (the newest runs/<run>/ holding adapter_config.json, stand-ins left out),
  `resolve_path`, `build_parser` / `read_settings` (argparse from a script's constants block, script_settings.py);
- inputs, checked before any model is loaded; each failure is an InputError with a one-line reason, which the
  scripts print and exit with code 2 (`fail`): `check_settings` (counts and sampling settings in range),
  `read_adapter_config` (a JSON object; weights whole and finite, `check_adapter_weights`), `resolve_base_model`
  (the recorded base found again in this checkout), `read_prompt_frame`, `check_adapter_fits_base` (LoRA tensor
  names and shapes against the base model's modules, on the meta device), `check_run_tokenizer` (the run's saved
  tokenizer is the base's), `check_writable` (the reports can be written); after loading, `check_adapter_output`
  (the adapted model's logits are finite);
- loading: `load_adapted_model` (the base through model_loader, its experts as EXPERTS_FORMAT says, plus the PEFT
  adapter);
- evaluation: `evaluate_base_and_adapter` (same prompts and sampling seeds; `model.disable_adapter()` for the base),
  `compare_scores`;
- reports: `read_training_log`, `plot_training_curve`, `plot_action_counts`, `render_evaluation_summary`,
  `write_json` (strict JSON) / `save_figure` / `write_answers` (atomic: a reader never sees a half-written file).
"""

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import harmony
import model_loader
import tiny_gpt_oss
from adapters.adapter_merge import prompt_logits
from data_reward import DataError, optimal_actions, validate_data_files
from gpu_engine import expert_lora
from gpu_engine.mxfp4 import CheckpointError, read_safetensors_header
from output_files import strict_json, why_not_writable, write_csv_atomically, write_text_atomically
from script_settings import apply_flags, build_parser  # noqa: F401  (build_parser: used as ae.build_parser)
from training import evaluation
from training.rewards import reward_metric
from training.run_directory import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
# ----------------------------------------------------------------------------------------------
RUNS_DIR = ROOT / "runs"  # where train_grpo.py writes run directories
STAND_INS = "stand-ins"  # runs/ subdirectory of the built stand-in models (never a run)
ADAPTER_CONFIG = "adapter_config.json"  # PEFT adapter config, marks a run directory
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT adapter weights
TRAINING_KEYS = {  # log_history keys of trainer_state.json, first one found wins
    "action_reward": (reward_metric("action_reward"),),
    "reward": ("reward",),
    "valid_rate": ("valid_rate", "train/valid_rate"),
    "accuracy": ("accuracy", "train/accuracy"),
}
SMOOTHING = 10  # steps in the rolling mean drawn over the training curves
METRICS = ("valid_rate", "accuracy", "mean_reward", "mean_regret")  # what compare_scores subtracts
# ----------------------------------------------------------------------------------------------


class InputError(ValueError):
    """Bad input (missing adapter, adapter for another model, unusable prompt file, ...); one-line message."""


def fail(error):
    """Print `error: <reason>` as the last line on stderr and exit with code 2 (bad input, nothing written)."""
    print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def one_line(text):
    """A multi-line message (data_reward lists one problem a line) as one line."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def log(message):
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- settings


def read_settings(parser, constants, argv=None):
    """The constants with the command line's flags applied."""
    return apply_flags(parser.parse_args(argv), constants)


def check_settings(settings):
    """InputError for a count or sampling setting out of range, among those a script has."""
    minimum = {"MAX_PROMPTS": 0, "VERIFY_PROMPTS": 1, "LOGIT_PROMPTS": 1, "SAMPLES": 1, "MAX_NEW_TOKENS": 1,
               "BATCH_SIZE": 1, "VERIFY_POSITIONS": 1, "MAX_SHARD_BYTES": 1}
    for name, least in minimum.items():
        if name in settings and settings[name] < least:
            raise InputError(f"--{flag_name(name)} must be at least {least}, got {settings[name]}")
    if "TEMPERATURE" in settings and not (math.isfinite(settings["TEMPERATURE"]) and settings["TEMPERATURE"] > 0):
        raise InputError(f"--temperature must be a number above 0, got {settings['TEMPERATURE']}; 1.0 is gpt-oss's "
                         "recommended sampling temperature")
    if "TOP_P" in settings and not 0 < settings["TOP_P"] <= 1:
        raise InputError(f"--top-p must lie in (0, 1], got {settings['TOP_P']}; 1.0 turns nucleus sampling off")
    if "EXPERTS_FORMAT" in settings and settings["EXPERTS_FORMAT"] not in EXPERTS_FORMATS:
        raise InputError(f"--experts-format {settings['EXPERTS_FORMAT']!r} is not one of {', '.join(EXPERTS_FORMATS)}")
    if "MAX_UPDATE_LOSS" in settings and not (math.isfinite(settings["MAX_UPDATE_LOSS"])
                                              and settings["MAX_UPDATE_LOSS"] >= 0):
        raise InputError(f"--max-update-loss must be a number of at least 0, got {settings['MAX_UPDATE_LOSS']}")
    if "MIN_ARGMAX_AGREEMENT" in settings and not 0 <= settings["MIN_ARGMAX_AGREEMENT"] <= 1:
        raise InputError(f"--min-argmax-agreement must lie in [0, 1], got {settings['MIN_ARGMAX_AGREEMENT']}")
    if "LOGIT_TOLERANCE" in settings and not (math.isfinite(settings["LOGIT_TOLERANCE"])
                                              and settings["LOGIT_TOLERANCE"] >= 0):
        raise InputError(f"--logit-tolerance must be a number of at least 0, got {settings['LOGIT_TOLERANCE']}")


EXPERTS_FORMATS = ("auto", "bf16", "mxfp4")  # model_loader.EXPERTS_FORMAT_CHOICES, checked before torch is imported


def check_writable(directory):
    """InputError unless files can be written into `directory` (before any work whose results would be lost)."""
    reason = why_not_writable(directory, directory=True)
    if reason:
        raise InputError(reason)


def flag_name(name):
    return name.lower().replace("_", "-")


def resolve_path(path):
    """A path as given: absolute stays, relative is taken from the repository root (like train_grpo.py)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


# ---------------------------------------------------------------------------------------------- inputs


def find_newest_run(runs_dir=RUNS_DIR):
    """The run directory under `runs_dir` whose adapter_config.json is newest (runs/stand-ins excluded)."""
    runs_dir = Path(runs_dir)
    candidates = [d for d in runs_dir.iterdir() if d.is_dir() and d.name != STAND_INS
                  and (d / ADAPTER_CONFIG).is_file()] if runs_dir.is_dir() else []
    if not candidates:
        raise InputError(f"no run directory under {runs_dir} holds {ADAPTER_CONFIG}; train one "
                         "(python train_grpo.py --tiny) or pass --adapter-path")
    return max(candidates, key=lambda d: (d / ADAPTER_CONFIG).stat().st_mtime)


def resolve_adapter_dir(adapter_path):
    """--adapter-path as a directory: '' means the newest run."""
    return find_newest_run() if not adapter_path else resolve_path(adapter_path)


def read_adapter_config(adapter_dir):
    """The adapter's adapter_config.json as a dict, after checking the directory holds a usable LoRA adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise InputError(f"{adapter_dir}: no such adapter directory; pass --adapter-path runs/<run> "
                         f"(a directory holding {ADAPTER_CONFIG})")
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir}: not a directory; --adapter-path is the run directory holding "
                         f"{ADAPTER_CONFIG}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise InputError(f"{adapter_dir}: no {name}; is it a run directory written by train_grpo.py?")
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: not valid JSON ({error}); is it the file PEFT "
                         "wrote? Copy the run again") from None
    if not isinstance(config, dict):
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: holds a JSON {type(config).__name__}, not the object "
                         "PEFT writes; copy the run again")
    if config.get("peft_type") != "LORA":
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}; "
                         "only LoRA adapters are supported")
    check_adapter_weights(adapter_dir / ADAPTER_WEIGHTS)
    return config


def check_adapter_weights(path):
    """InputError for adapter weights that are cut off or hold NaN or infinite values (a diverged run).

    Reads one tensor at a time: an adapter is small next to its base, and every tensor is read on loading anyway.
    """
    try:
        read_safetensors_header(str(path))  # also refuses a file shorter than its header says
        with safe_open(str(path), "pt") as f:
            bad = []
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad.append(name)
    except (CheckpointError, SafetensorError, OSError) as error:
        raise InputError(f"{path}: unreadable ({one_line(error)}); copy the run again") from None
    if bad:
        raise InputError(f"{path}: {len(bad)} LoRA tensors hold NaN or infinite values (first: {bad[0]}); the "
                         "training diverged. Use an earlier checkpoint (--adapter-path <run>/checkpoint-<step>) or "
                         "train again with a lower --learning-rate")


def has_finite_output(model, tokenizer, prompt):
    """True when every logit of the model on `prompt` is finite (sampling from NaN or inf logits is meaningless)."""
    return bool(prompt_logits(model, tokenizer, [prompt])[0].isfinite().all())


def check_adapter_output(model, tokenizer, prompt, adapter_dir):
    """InputError when the adapted model's logits on `prompt` are not all finite (weights too large to use)."""
    if not has_finite_output(model, tokenizer, prompt):
        raise InputError(f"{adapter_dir}: with this adapter the model's logits are NaN or infinite (its weights are "
                         "finite but far too large); the training diverged. Use an earlier checkpoint "
                         "(--adapter-path <run>/checkpoint-<step>) or train again with a lower --learning-rate")


def expert_lora_targets(adapter_config):
    """The expert parameters the adapter trains through `target_parameters` (empty for attention-only LoRA)."""
    targets = adapter_config.get("target_parameters") or []
    return [t for t in targets if t.split(".")[-1] in ("gate_up_proj", "down_proj")]


def resolve_base_model(adapter_config, base_model_id, adapter_dir):
    """--base-model-id, or the adapter's own base_model_name_or_path when it is ''.

    What the adapter records is found again in this checkout: train_grpo.py records 'tiny' or a path relative to
    the repository; an absolute path of a moved or re-cloned checkout is looked up under this one
    (model_loader.resolve_recorded_model_id). A relative --base-model-id is taken from the repository root.
    """
    if base_model_id:
        return model_loader.resolve_recorded_model_id(base_model_id)
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: records no base_model_name_or_path; pass --base-model-id")
    base = model_loader.resolve_recorded_model_id(recorded)
    if base != recorded and os.path.isabs(recorded):
        log(f"note: {recorded}, the base recorded by {adapter_dir}, is not there; using {base} in this checkout")
    return base


def same_model(a, b):
    """True when two model ids name the same model ('tiny' and local directories compared by real path)."""
    def canonical(model_id):
        if model_id == model_loader.TINY:
            return os.path.realpath(tiny_gpt_oss.TINY_DIR)
        return os.path.realpath(model_id) if os.path.isdir(model_id) else model_id

    return canonical(a) == canonical(b)


def read_prompt_frame(prompt_path, split="eval", max_prompts=0):
    """Validated rows of a Harmony data CSV (data_reward's checks) of `split` ('' = all); N of them spread evenly."""
    path = resolve_path(prompt_path)
    try:
        frame = validate_data_files([path], require_rewards=True)[path]
    except DataError as error:
        raise InputError(f"{path}: not usable as a prompt file: {one_line(error)}") from None
    if not frame["prompt"].map(harmony.is_harmony_prompt).all():
        raise InputError(f"{path}: prompts are not Harmony; convert them with python convert_to_harmony.py {path}")
    if split:
        if "split" not in frame.columns:
            raise InputError(f"{path}: no `split` column to pick the {split!r} rows from; pass --split '' to use "
                             "every row")
        frame = frame[frame["split"] == split]
        if frame.empty:
            raise InputError(f"{path}: no rows with split == {split!r}")
    if max_prompts and max_prompts < len(frame):
        # spread over the whole split: its rows run through time, and the first N hours are one kind of situation
        frame = frame.iloc[np.unique(np.linspace(0, len(frame) - 1, max_prompts).round().astype(int))]
    return frame.reset_index(drop=True)


def check_adapter_fits_base(adapter_dir, base_model_id):
    """Check every LoRA tensor of the adapter against the base model's modules; return what was checked.

    The base is built on the meta device from its config (no weights read, seconds even for the 20b) and
    wrapped with the adapter's own LoraConfig; the LoRA tensors that makes must be exactly the stored ones,
    name for name and shape for shape. An adapter trained on a model with another hidden size, layer count or
    expert count fails here with the first differing tensor named.
    """
    adapter_dir = Path(adapter_dir)
    try:
        header = read_safetensors_header(str(adapter_dir / ADAPTER_WEIGHTS))
    except CheckpointError as error:
        raise InputError(f"{adapter_dir / ADAPTER_WEIGHTS}: unreadable ({error})") from None
    stored = {name: tuple(entry["shape"]) for name, entry in header.items()}
    base_path = model_loader.resolve_model_id(base_model_id)
    config = model_loader.load_config(base_path)
    if getattr(config, "quantization_config", None):
        del config.quantization_config  # the shapes asked about are those of the dequantised model
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    peft_config.base_model_name_or_path = str(base_path)  # as resolved here (PEFT warns when they differ)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model_loader.silence_known_notices()  # PEFT reads a property transformers marks deprecated
    where = f"{adapter_dir}: the adapter does not fit the base model {base_model_id}"
    try:
        wrapped = get_peft_model(model, peft_config)
        expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(wrapped).items()}
    except (ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"{where} ({one_line(error)}); pass the --base-model-id it was trained on") from None
    shape_of = (f"hidden size {config.hidden_size}, {config.num_hidden_layers} layers, "
                f"{config.num_local_experts} experts")
    for name in sorted(stored):
        if name not in expected:
            raise InputError(f"{where} ({shape_of}): it holds {name}, which has no module in the base; "
                             "pass the --base-model-id it was trained on")
        if stored[name] != expected[name]:
            raise InputError(f"{where} ({shape_of}): {name} has shape {stored[name]}, the base needs "
                             f"{expected[name]}; pass the --base-model-id it was trained on")
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise InputError(f"{where}: {len(missing)} LoRA tensors its config asks for are not stored (first: "
                         f"{missing[0]}); the adapter file is incomplete")
    return {"base_model": base_model_id, "base_path": str(base_path), "lora_tensors": len(stored),
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers}


def check_run_tokenizer(adapter_dir, base_model_id):
    """The tokenizer saved with the run must be the base model's: a base rebuilt since training has other ids.

    An adapter trained on an earlier build of a stand-in still fits its shapes, but reads and writes other tokens.
    """
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return
    run_vocab = load_run_tokenizer(adapter_dir, base_model_id).get_vocab()
    base_vocab = model_loader.load_tokenizer(base_model_id).get_vocab()
    if run_vocab != base_vocab:
        differing = len(set(run_vocab.items()) ^ set(base_vocab.items()))
        raise InputError(f"{adapter_dir}: its tokenizer differs from the one of the base model {base_model_id} "
                         f"({len(run_vocab)} vs {len(base_vocab)} entries, {differing} differing): the adapter was "
                         "trained on another base (or on an earlier build of it); retrain, or pass the "
                         "--base-model-id it was trained on")


def check_inputs(settings):
    """Resolve and check adapter, base model and prompts from a script's settings; InputError on bad input.

    Returns (adapter_dir, adapter_config, base_model_id, frame, fit) without loading any weights.
    """
    check_settings(settings)
    adapter_dir = resolve_adapter_dir(settings["ADAPTER_PATH"])
    adapter_config = read_adapter_config(adapter_dir)
    base = resolve_base_model(adapter_config, settings["BASE_MODEL_ID"], adapter_dir)
    frame = read_prompt_frame(settings["PROMPT_PATH"], settings["SPLIT"], settings["MAX_PROMPTS"])
    try:
        fit = check_adapter_fits_base(adapter_dir, base)
    except model_loader.ModelLoadError as error:
        raise InputError(f"{error} (base model of {adapter_dir}; pass --base-model-id)") from None
    check_run_tokenizer(adapter_dir, base)
    recorded = adapter_config.get("base_model_name_or_path")
    recorded = recorded and model_loader.resolve_recorded_model_id(recorded)
    fit["matches_recorded_base"] = bool(recorded) and same_model(recorded, base)
    if recorded and not fit["matches_recorded_base"]:
        log(f"warning: {adapter_dir} was trained on {recorded}; evaluating it on {base} (its LoRA shapes fit)")
    return adapter_dir, adapter_config, base, frame, fit


# ---------------------------------------------------------------------------------------------- loading


def load_run_tokenizer(adapter_dir, base_model_id):
    """The tokenizer saved with the run (train_grpo.py saves it), else the base model's."""
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(adapter_dir))
    return model_loader.load_tokenizer(base_model_id)


def load_adapted_model(adapter_dir, base_model_id, device=None, dtype=None, experts_format="auto"):
    """(PeftModel in eval mode, tokenizer): the base through model_loader (experts kept in MXFP4 with
    experts_format='mxfp4', the default on a GPU, an expert LoRA then added as low-rank terms; or dequantised with
    'bf16', the default on a CPU) plus the adapter."""
    model = model_loader.load_model(base_model_id, device=device, dtype=dtype, experts_format=experts_format)
    model = expert_lora.load_adapter(model, adapter_dir)
    model.eval()
    return model, load_run_tokenizer(adapter_dir, base_model_id)


# ---------------------------------------------------------------------------------------------- evaluation


def decoding_settings(settings):
    """evaluation.evaluate_model's keyword arguments from a script's settings."""
    return dict(samples=settings["SAMPLES"], temperature=settings["TEMPERATURE"], top_p=settings["TOP_P"],
                max_new_tokens=settings["MAX_NEW_TOKENS"], seed=settings["SEED"], batch_size=settings["BATCH_SIZE"])


def evaluate_base_and_adapter(model, tokenizer, frame, settings, log=log):
    """Score the base (adapter disabled) and the adapter on the same prompts and seeds.

    Returns ({"base": scores, "adapter": scores}, {"base": actions, "adapter": actions}, {"base": answers, ...}),
    scores as evaluation.score_actions gives them; the base is evaluated first.
    """
    kwargs = decoding_settings(settings)
    scores, actions, answers = {}, {}, {}
    log(f"base model (adapter disabled): {len(frame)} prompts x {kwargs['samples']} answers")
    with model.disable_adapter():
        scores["base"], answers["base"], actions["base"] = evaluation.evaluate_model(model, tokenizer, frame,
                                                                                      log=log, **kwargs)
    log(f"adapter: {len(frame)} prompts x {kwargs['samples']} answers")
    scores["adapter"], answers["adapter"], actions["adapter"] = evaluation.evaluate_model(model, tokenizer, frame,
                                                                                          log=log, **kwargs)
    return scores, actions, answers


def compare_scores(reference, other, reference_actions=None, other_actions=None):
    """other - reference for each metric and action share; with both action arrays, how often they agree.

    Both must come from the same prompts and seeds: then `same_action_rate` is the share of (prompt, sample)
    pairs where the two models chose the same action (1.0 when their weights are the same).
    """
    delta = {k: other[k] - reference[k] for k in METRICS}
    delta["action_distribution"] = {a: other["action_distribution"][a] - reference["action_distribution"][a]
                                    for a in reference["action_distribution"]}
    if reference_actions is not None and other_actions is not None:
        delta["same_action_rate"] = float((np.asarray(reference_actions) == np.asarray(other_actions)).mean())
    return delta


def answers_frame(frame, actions, answers):
    """One row per (model, prompt, sample): row_id, optimal action, chosen action (-1 = invalid), completion."""
    best = optimal_actions(frame)
    ids = frame["row_id"].tolist() if "row_id" in frame.columns else list(range(len(frame)))
    rows = []
    for model_name in actions:
        for i, (row_actions, row_answers) in enumerate(zip(actions[model_name], answers[model_name])):
            for s, (a, text) in enumerate(zip(row_actions, row_answers)):
                rows.append({"model": model_name, "row_id": ids[i], "sample": s, "optimal_action": int(best[i]),
                             "action": int(a), "completion": text})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- training log


def find_trainer_state(run_dir):
    """run_dir/trainer_state.json, else the one of its newest complete checkpoint-*, else None."""
    run_dir = Path(run_dir)
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    complete, _ = list_checkpoints(run_dir)
    return complete[-1][1] / "trainer_state.json" if complete else None


def read_training_log(run_dir):
    """Per logged step: {"step", "action_reward", "reward", "valid_rate", "accuracy"} (None where not logged)."""
    path = find_trainer_state(run_dir)
    if path is None:
        return []
    try:
        history = json.loads(path.read_text()).get("log_history") or []
    except json.JSONDecodeError:
        return []
    rows = []
    for entry in history:
        row = {"step": entry.get("step")}
        for key, candidates in TRAINING_KEYS.items():
            value = next((entry[c] for c in candidates if c in entry), None)
            row[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        if row["step"] is not None and any(row[k] is not None for k in TRAINING_KEYS):
            rows.append(row)
    return rows


def summarize_training_log(rows, window=SMOOTHING):
    """Mean of each curve over the first and last `window` logged steps."""
    def mean(part, key):
        values = [r[key] for r in part if r[key] is not None]
        return sum(values) / len(values) if values else None

    if not rows:
        return None
    first, last = rows[:window], rows[-window:]
    return {"steps_logged": len(rows), "last_step": rows[-1]["step"], "window": window,
            "first": {k: mean(first, k) for k in TRAINING_KEYS}, "last": {k: mean(last, k) for k in TRAINING_KEYS}}


# ---------------------------------------------------------------------------------------------- plots and files


def rolling_mean(values, window):
    """Trailing mean over up to `window` points, NaN-aware (so the curve starts at step one)."""
    values = np.asarray(values, dtype=float)
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        part = part[~np.isnan(part)]
        if len(part):
            out[i] = part.mean()
    return out


def plot_training_curve(rows, path, title):
    """Two panels over training steps: rewards (top), valid rate and accuracy (bottom); raw and smoothed."""
    import matplotlib  # here, not at the top: the file-only backend (Agg) must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, layout="constrained")
    panels = ((top, (("action_reward", "action reward (Boltzmann)", "tab:blue"),
                     ("reward", "total reward", "tab:gray")), "reward per completion"),
              (bottom, (("valid_rate", "valid answers", "tab:green"),
                        ("accuracy", "accuracy (argmax Q)", "tab:orange")), "share of completions"))
    for axis, curves, ylabel in panels:
        for key, label, color in curves:
            values = [np.nan if r[key] is None else r[key] for r in rows]
            if np.all(np.isnan(values)):
                continue
            axis.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
            axis.plot(steps, rolling_mean(values, SMOOTHING), color=color, linewidth=2,
                      label=f"{label} ({SMOOTHING}-step mean)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=9)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("training step")
    top.set_title(title)
    save_figure(fig, path)


def plot_action_counts(panels, path, title):
    """One heatmap per (label, counts[optimal][predicted or invalid]) panel, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.8, 4.2), squeeze=False, layout="constrained")
    vmax = max(max(max(row) for row in counts) for _, counts in panels) or 1
    for axis, (label, counts) in zip(axes[0], panels):
        counts = np.asarray(counts)
        n_actions = counts.shape[0]
        image = axis.imshow(counts, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                axis.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=10,
                          color="white" if counts[i, j] > 0.6 * vmax else "black")
        axis.set_xticks(range(n_actions + 1), [f"[{a}]" for a in range(n_actions)] + ["invalid"])
        axis.set_yticks(range(n_actions), [f"[{a}]" for a in range(n_actions)])
        axis.set_xlabel("chosen action")
        axis.set_ylabel("optimal action (argmax Q)")
        diagonal = int(np.trace(counts[:, :n_actions]))
        axis.set_title(f"{label}\n{diagonal}/{int(counts.sum())} optimal choices", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="answers")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def save_figure(fig, path):
    """Save a matplotlib figure as PNG via a temporary file in the same directory and os.replace."""
    import matplotlib.pyplot as plt

    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        fig.savefig(temp_name, format="png", dpi=110, bbox_inches="tight")
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def write_json(data, path):
    """Strict JSON (NaN and infinities written as null), atomically."""
    write_text_atomically(strict_json(data), path)


def write_answers(frame, actions, answers, path):
    write_csv_atomically(answers_frame(frame, actions, answers), path)


def fmt(value, sign=False):
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def scores_table(rows, references):
    """Markdown table: one row per (label, scores) and the reference policies below."""
    lines = ["| policy | valid rate | accuracy | mean reward | mean regret (Q) |", "|---|---|---|---|---|"]
    for label, s in rows:
        lines.append(f"| {label} | {fmt(s['valid_rate'])} | {fmt(s['accuracy'])} | {fmt(s['mean_reward'])} | "
                     f"{fmt(s['mean_regret'])} |")
    u, c, o = references["uniform"], references["best_constant"], references["optimal"]
    lines += [f"| uniform guessing | 1.000 | {fmt(u['accuracy'])} | {fmt(u['mean_reward'])} | "
              f"{fmt(u['mean_regret'])} |",
              f"| best constant [{c['action']}] | 1.000 | {fmt(c['accuracy'])} | {fmt(c['mean_reward'])} | "
              f"{fmt(c['mean_regret'])} |",
              f"| optimal (argmax Q) | 1.000 | 1.000 | {fmt(o['mean_reward'])} | 0.000 |"]
    return lines


def distribution_table(rows):
    """Markdown table of the action distributions (share of answers per action, and invalid)."""
    keys = list(rows[0][1]["action_distribution"])
    lines = ["| policy | " + " | ".join(f"[{k}]" if k != "invalid" else k for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for label, s in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(s["action_distribution"][k]) for k in keys) + " |")
    return lines


def render_evaluation_summary(report):
    """eval_summary.md of test_lora_adapter.py."""
    m, d = report["models"], report["delta"]
    lines = [f"# Adapter evaluation: {report['adapter_path']}", "",
             f"Base model `{report['base_model']}`; {report['prompts']} prompts (`{report['prompt_path']}`, split "
             f"`{report['split'] or 'all'}`) x {report['decoding']['samples']} answers, temperature "
             f"{report['decoding']['temperature']}, top_p {report['decoding']['top_p']}, at most "
             f"{report['decoding']['max_new_tokens']} new tokens, seed {report['decoding']['seed']}; same prompts "
             f"and seeds for both models. Invalid answers earn reward 0 and the row's worst regret.", ""]
    lines += scores_table([("base (adapter disabled)", m["base"]), ("adapter", m["adapter"])], report["references"])
    lines += ["", f"Adapter minus base: valid rate {fmt(d['valid_rate'], True)}, accuracy {fmt(d['accuracy'], True)}, "
              f"mean reward {fmt(d['mean_reward'], True)}, mean regret {fmt(d['mean_regret'], True)}; same action "
              f"on {100 * d['same_action_rate']:.1f}% of (prompt, sample) pairs."]
    if report.get("gain"):
        g = report["gain"]
        lines += ["", f"Gain in mean reward: {fmt(g['mean'], True)}, 95% interval {fmt(g['ci95'][0], True)} to "
                  f"{fmt(g['ci95'][1], True)} (paired bootstrap over the {g['prompts']} prompts: an interval that "
                  "holds 0 means the gain may be noise)."]
    lines += ["", "Action distribution:", ""]
    lines += distribution_table([("base", m["base"]), ("adapter", m["adapter"])])
    training = report.get("training")
    lines += [""]
    if training:
        f, last = training["first"], training["last"]
        lines.append(f"Training ({training['steps_logged']} logged steps, last step {training['last_step']}): action "
                     f"reward {fmt(f['action_reward'])} -> {fmt(last['action_reward'])}, valid rate "
                     f"{fmt(f['valid_rate'])} -> {fmt(last['valid_rate'])} (means of the first and last "
                     f"{training['window']} steps).")
    else:
        lines.append("No trainer_state.json in the run: no training curve.")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report["plots"].values() if p), ""]
    return "\n".join(lines)
