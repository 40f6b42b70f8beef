"""Merge a trained LoRA adapter into gpt-oss and write a complete model directory (for Ollama, vLLM, the Hub), its
experts in MXFP4 as gpt-oss ships them, or in bf16.

    python export_quantized_model.py                               # newest run -> runs/export/gpt-oss-tes
    python export_quantized_model.py --adapter-path runs/grpo-tiny --out runs/export/tiny --overwrite true
    python export_quantized_model.py --experts-format bf16         # expert LoRA kept exactly, 3x the size
    HF_TOKEN=hf_... HF_REPO_ID=me/gpt-oss-tes python export_quantized_model.py --push-to-hub true

Steps: finish what an export killed while publishing left beside the target (its complete export goes into place,
or the previous one back) and remove the rest killed exports left there (`.NAME.partial-*`, `.NAME.old-*`,
model-sized), saying what was done, at the start of every export, refused or not; check the inputs (adapter
directory, adapter weights all finite, adapter against base, output directory, Hub token) before any model is loaded;
load the base through model_loader in bf16 (MXFP4 experts dequantised exactly) and the PEFT adapter;
merge (`merge_and_unload`, in place); bring the experts back to MXFP4 with gpu_engine/mxfp4.py: experts the adapter did
not touch are the base checkpoint's own `_blocks` / `_scales` bytes, experts changed by expert LoRA are quantised with
the base's scales as `like_scales`; write safetensors shards (each expert's blocks and scales in one shard, blocks
first), config.json with the mxfp4 quantization_config, generation_config.json, tokenizer and chat template,
export_report.json (strict JSON: a value that is not a finite number is null). Nothing is written while the merged
model's logits are not all finite (an adapter of a diverged run). Everything is written into a temporary directory
beside the target and renamed into place only after the export verified itself, so an interrupted or failed export
never leaves a half model (and an overwrite killed between its renames is finished by the next run, so the target
always holds a complete export, the old or the new one):
- mxfp4.check_mxfp4_checkpoint on the directory; tensor names equal to the base checkpoint's;
- every stored tensor compared byte for byte with the base checkpoint: with an attention-only adapter every expert
  tensor must be identical;
- the directory reloaded through model_loader, its logits on VERIFY_PROMPTS held-out prompts compared with the
  in-memory merged model's (after its experts were rounded to the stored MXFP4 values): they must agree within
  LOGIT_TOLERANCE (NaN or infinite logits fail). With expert LoRA the report adds the quantisation error: relative
  error of the expert weights and of their LoRA update, and the logit difference to the merged model before rounding.
What survives of the training comes first in the summary and in export_report.json ("fidelity"): "exact" (an
attention-only adapter: its weights merged in bf16, experts the base's own bytes; or --experts-format bf16),
or "lossy" (expert LoRA rounded to MXFP4: the share of the expert update kept, and how often the written model's
next token agrees with the merged bf16 model's). MXFP4 has about 3 bits of mantissa: an expert update smaller than
half a step rounds away, which is what a real run's learning rates give. When rounding loses more than
MAX_UPDATE_LOSS of the update or the agreement falls below MIN_ARGMAX_AGREEMENT, the export stops before writing
and names the two ways on: --experts-format bf16 (exact, experts 3.8x larger) or --allow-lossy true.
An output directory that already holds an export is refused unless --overwrite true. With PUSH_TO_HUB the finished
directory is uploaded to the private Hub repo HF_REPO_ID (created if needed) with the token in HF_TOKEN (never
printed); a push without a token is refused before any work, a push that fails (no network) says that the export
itself is complete and how to push it later. Time and peak memory (CPU RSS; CUDA allocated on a GPU) are printed and
recorded in export_report.json.

Memory. The merge runs on model_loader's device (a CUDA GPU when present) in bf16 and holds one copy of the
model: merged in place, freed before the export is reloaded for the check. Tensors go to the CPU one at a time
while a shard (MAX_SHARD_BYTES) is written; untouched experts are read from the base checkpoint only when written;
changed experts wait on the CPU as MXFP4 (0.53 byte a weight). For openai/gpt-oss-20b (20.9 B parameters = 38.9 GiB
in bf16; 24 layers x 32 experts x 24.9 M = 19.1 B expert weights = 9.5 GiB in MXFP4), measured on an H100 80GB
with the 20b-shaped stand-in (benchmarks/RESULTS.md): 18 s, 42.8 GiB of GPU memory and 15.0 GiB of CPU RAM with an
attention-only adapter; 30 s, 48.2 GiB and 15.7 GiB with expert LoRA.
- a CPU-only machine: all of the above in RAM: ~45 GiB (1.2x the bf16 model), ~55 GiB with expert LoRA; plan for
  64 GiB, and hours of bf16 matmuls on the CPU. model_loader refuses models above 2 B parameters on a CPU
  (MAX_CPU_PARAMETERS), so without a GPU this script exports the tiny stand-in and small models only.
"""

import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import script_settings
from output_files import why_not_writable

# torch, transformers and this project's modules built on them are imported in the functions that use them: --help
# and a wrong flag answer at once instead of after ~10 s of imports.

# -----------------------------------------------------------------------------
ADAPTER_PATH = ""  # run directory holding adapter_config.json; '' = the newest under runs/
BASE_MODEL_ID = ""  # '' = the adapter's base_model_name_or_path; or a Hub id, a local model directory, 'tiny'
EXPORT_DIR = "runs/export/gpt-oss-tes"  # output model directory (the Modelfile's FROM points here)
EXPERTS_FORMAT = "mxfp4"  # experts as written: 'mxfp4' (gpt-oss' own format, ~13 GB at 20b; expert LoRA is rounded
                          #   to it) or 'bf16' (every weight exactly as merged, ~39 GB at 20b; README: who reads which)
ALLOW_LOSSY = False  # write an MXFP4 export even when rounding drops most of expert LoRA's update (limits below)
MAX_UPDATE_LOSS = 0.5  # expert LoRA into MXFP4: stop when the update's relative error (mean over weights) is above
MIN_ARGMAX_AGREEMENT = 0.95  # ... or when the written model's next token agrees with the merged bf16 model's at
                             #   fewer of the verification positions than this
OVERWRITE = False  # replace an existing export in EXPORT_DIR
MAX_SHARD_BYTES = 5_000_000_000  # safetensors shard size (what save_pretrained uses)
PROMPT_PATH = "data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"  # verification prompts
SPLIT = "eval"  # verification prompts come from this split
VERIFY_PROMPTS = 4  # held-out prompts whose logits are compared after reloading the export
VERIFY_POSITIONS = 64  # last tokens of each prompt compared (the 20b has 201088 logits a token)
LOGIT_TOLERANCE = 1e-3  # reloaded vs in-memory logits may differ by this much, relative to the largest logit
PUSH_TO_HUB = False  # upload the export to the private Hub repo $HF_REPO_ID with the token in $HF_TOKEN
HF_REPO_ID = ""  # Hub repo to push to; '' = $HF_REPO_ID
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper()]
REPORT_FILE = "export_report.json"
BASE_FILES = ("LICENSE", "USAGE_POLICY")  # copied from the base model directory when there (openai/gpt-oss-20b has)
EXPORT_MARKERS = ("config.json", REPORT_FILE, "model.safetensors", "model.safetensors.index.json")


class ExportError(RuntimeError):
    """The export could not be made (nothing was published) or pushed; the message says which and what to do."""


class VerificationError(ExportError):
    """The merged model or the written export is not sound; nothing was published."""


class LossyExportError(ExportError):
    """MXFP4 rounding breaks MAX_UPDATE_LOSS or MIN_ARGMAX_AGREEMENT for expert LoRA; nothing was written."""


class PushError(ExportError):
    """The export is published locally, the Hub upload failed."""


def holds_export(path):
    path = Path(path)
    return path.is_dir() and (any((path / name).exists() for name in EXPORT_MARKERS) or any(path.glob("*.safetensors")))


def check_output_dir(out, overwrite):
    """Refuse an output directory that holds an export (unless overwrite) or anything else."""
    from adapters import adapter_evaluation as ae

    out = Path(out)
    if holds_export(out) and not overwrite:
        raise ae.InputError(f"{out} already holds an export; pass --overwrite true to replace it, or choose another "
                            "--out")
    if out.exists() and not holds_export(out) and (not out.is_dir() or any(out.iterdir())):
        raise ae.InputError(f"{out} exists and is not an export; choose another --out")

    # the export is written beside its target, then renamed into place
    reason = why_not_writable(out, directory=True) or why_not_writable(out.parent, directory=True)
    if reason:
        raise ae.InputError(reason)


def remove_stale_partials(out, log):
    """Remove what killed exports to `out` left beside it (`.NAME.partial-<pid>-*`, `.NAME.old-*`: model-sized).

    A directory whose writer is still running (its pid is alive) is left alone.
    """
    out = Path(out)
    for path in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if ".partial-" in path.name and writer_alive(path, ".partial-"):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path)
        log(f"removed {path.name} ({size / 2**30:.2f} GiB), left by an interrupted export")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def check_not_an_input(out, inputs):
    """Refuse an output directory that is, or holds, one of the inputs (--overwrite would delete it)."""
    from adapters import adapter_evaluation as ae

    for path in inputs:
        if Path(out).resolve() == Path(path).resolve() or Path(path).resolve().is_relative_to(Path(out).resolve()):
            raise ae.InputError(f"--out {out} would replace {path}, an input of this export; choose another --out")


def hub_target(settings):
    """(repo id, token) for --push-to-hub; InputError before any work when either is missing."""
    from adapters import adapter_evaluation as ae

    token = os.environ.get("HF_TOKEN", "").strip()
    repo_id = settings["HF_REPO_ID"] or os.environ.get("HF_REPO_ID", "").strip()
    if not token:
        raise ae.InputError("--push-to-hub needs a Hugging Face write token in the environment variable HF_TOKEN")
    if not repo_id:
        raise ae.InputError("--push-to-hub needs the repo to push to: set HF_REPO_ID (e.g. you/gpt-oss-tes) or pass "
                            "--hf-repo-id")
    return repo_id, token


def push_to_hub(export_dir, repo_id, token):
    """Create the private model repo if needed and upload the export directory (the token is never printed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, repo_type="model",
                      commit_message=f"Export of {Path(export_dir).name} (merged LoRA, MXFP4 experts)")
    return f"https://huggingface.co/{repo_id}"


def publish(tmp_dir, out):
    """Rename the finished temporary directory into place, replacing an older export.

    mkdtemp makes the directory private (0700) and safetensors writes 0600: give both the usual modes first, so
    that another user (an Ollama service, a Hub uploader) can read the export.
    """
    out = Path(out)
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(tmp_dir).iterdir():
        os.chmod(path, 0o666 & ~umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    # renamed first to say 'complete': a kill anywhere below leaves either the old export at `out` or this one
    # ready beside it, and the next export finishes the swap (recover_interrupted_publish)
    ready = Path(tmp_dir).with_name(Path(tmp_dir).name.replace(".partial-", ".ready-", 1))
    os.replace(tmp_dir, ready)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(ready, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(ready, out)


def recover_interrupted_publish(out, log):
    """Finish the swap of an export that was killed while being published, so `out` holds a complete export.

    A `.NAME.ready-*` directory is a complete, verified export that was about to replace `out`: it goes into place
    (the export it replaces, if still there, is set aside and removed). Without one, a missing `out` whose previous
    export sits in `.NAME.old-*` gets that one back. Directories of a publisher still running are left alone.
    """
    out = Path(out)
    ready = [p for p in sorted(out.parent.glob(f".{out.name}.ready-*"), key=lambda p: p.stat().st_mtime)
             if not writer_alive(p, ".ready-")]
    if ready:
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
        os.replace(ready[-1], out)
        log(f"finished publishing the export that an interrupted run left complete beside {out}")
        return
    previous = [p / out.name for p in sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
                if (p / out.name).is_dir()]
    if not out.exists() and previous:
        os.replace(previous[-1], out)
        log(f"restored the previous export of {out}, which an interrupted run had set aside")


def writer_alive(path, marker):
    """True when the name of `path` (`.NAME<marker><pid>-...`) names another process that is still running."""
    pid = path.name.rsplit(marker, 1)[-1].split("-")[0]
    return pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid))


def compare_bytes(export_dir, base_reader, experts_format="mxfp4"):
    """Per tensor of the export: identical bytes to the base checkpoint's tensor of that name, or not; and whether
    its names are those the format asks (the base's; with bf16 experts `..._proj` in place of its blocks and scales)."""
    import torch

    from adapters.adapter_merge import CheckpointReader

    export = CheckpointReader(export_dir)
    expected = set(base_reader.names())
    if experts_format == "bf16":
        expected = {name.removesuffix("_blocks") for name in expected if not name.endswith("_scales")}
    result = {"same_names": sorted(export.names()) == sorted(expected),
              "expert_identical": 0, "expert_changed": [], "other_identical": 0, "other_changed": 0}
    for name in export.names():
        if name not in base_reader:
            continue
        a, b = export.get(name), base_reader.get(name)
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))
        if name.endswith(("_blocks", "_scales")):
            if same:
                result["expert_identical"] += 1
            else:
                result["expert_changed"].append(name)
        else:
            result["other_identical" if same else "other_changed"] += 1
    return result


def save_bf16_checkpoint(model, config, out_dir, max_shard_bytes):
    """The merged model as a plain gpt-oss checkpoint (bf16 experts `gate_up_proj` / `down_proj`, no
    quantization_config), written by mxfp4.save_checkpoint rather than save_pretrained (see there why); `config` is
    the base's config.json with the converters' keys; returns the shard names."""
    from gpu_engine.mxfp4 import save_checkpoint

    return save_checkpoint(model.state_dict(), config, str(out_dir), max_shard_bytes, experts_format="bf16")


def measure_fidelity(experts_format, changed, quantization, vs_merged):
    """What of the training the written model keeps: 'exact' or 'lossy', the share of the expert LoRA update kept
    (1 - its relative rounding error, at least 0) and agreement with the merged bf16 model; `summary` says it."""
    agreement = {"argmax_agreement": vs_merged["argmax_agreement"], "max_abs_diff": vs_merged["max_abs_diff"],
                 "positions": vs_merged["positions"]}
    loss = quantization["update_relative_error_mean"] if quantization else None
    fidelity = {"verdict": "lossy" if experts_format == "mxfp4" and changed else "exact",
                "expert_update_kept": quantization["update_kept"] if quantization else None,
                "update_relative_error_mean": loss, "vs_merged_bf16": agreement}
    if fidelity["verdict"] == "exact":
        fidelity["summary"] = ("exact: every weight as merged, the experts in bf16" if experts_format == "bf16" else
                               "exact: the adapter merged in bf16, the experts the base's own MXFP4 bytes")
    else:
        kept = "an unmeasured share" if loss is None else f"{fidelity['expert_update_kept']:.0%}"
        fidelity["summary"] = (f"lossy: MXFP4 keeps {kept} of the expert LoRA update; next token as the merged bf16 "
                               f"model's at {agreement['argmax_agreement']:.1%} of {agreement['positions']} "
                               f"positions, max |logit diff| {agreement['max_abs_diff']:.3g}")
    return fidelity


def why_too_lossy(fidelity, settings):
    """The limits (MAX_UPDATE_LOSS, MIN_ARGMAX_AGREEMENT) a lossy export breaks, as sentences; [] when none."""
    if fidelity["verdict"] != "lossy":
        return []
    reasons = []
    loss, agreement = fidelity["update_relative_error_mean"], fidelity["vs_merged_bf16"]
    if loss is not None and not loss <= settings["MAX_UPDATE_LOSS"]:
        reasons.append(f"the rounding error is {loss:.2f} times the expert update (--max-update-loss "
                       f"{settings['MAX_UPDATE_LOSS']}), {fidelity['expert_update_kept']:.0%} of it kept")
    if not agreement["argmax_agreement"] >= settings["MIN_ARGMAX_AGREEMENT"]:
        reasons.append(f"the next token agrees with the merged bf16 model's at {agreement['argmax_agreement']:.1%} of "
                       f"{agreement['positions']} positions (--min-argmax-agreement "
                       f"{settings['MIN_ARGMAX_AGREEMENT']})")
    return reasons


def export_sizes(model):
    """GiB of the model's weights written with MXFP4 experts (4.25 bits a value) and with bf16 ones."""
    from adapters.adapter_merge import expert_weights

    experts = sum(p.numel() for p in expert_weights(model).values())
    others = sum(p.numel() for p in model.parameters()) - experts
    return {"mxfp4_gib": (2 * others + experts * 17 / 32) / 2**30, "bf16_gib": 2 * (others + experts) / 2**30}


def size_text(gib):
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def memory_use(device):
    """Peak CPU RSS and (on a GPU) peak CUDA memory allocated so far, in GiB."""
    import torch

    use = {"peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3)}
    if device == "cuda":
        use["peak_cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return use


def export(settings, log=None):
    """The whole export; returns the report. Inputs are checked first (InputError), nothing is written before."""
    import torch
    from huggingface_hub.errors import HTTPError

    import model_loader
    from adapters import adapter_evaluation as ae
    from adapters.adapter_merge import (CheckpointReader, add_converter_config_keys, compare_logits,
                                        expert_quantization_error, export_state_dict, load_quantized_experts,
                                        local_checkpoint_dir, lora_expert_parameters, prompt_logits, quantize_experts)
    from gpu_engine.mxfp4 import check_mxfp4_checkpoint, save_mxfp4_checkpoint

    log = log or ae.log
    ae.check_settings(settings)
    if settings["EXPERTS_FORMAT"] == "auto":  # check_settings took it: it chooses how a model runs, not is written
        raise ae.InputError(f"--experts-format {settings['EXPERTS_FORMAT']!r}: an export writes its experts as "
                            "'mxfp4' or 'bf16'; choose one")
    hub = hub_target(settings) if settings["PUSH_TO_HUB"] else None
    adapter_dir = ae.resolve_adapter_dir(settings["ADAPTER_PATH"])
    adapter_config = ae.read_adapter_config(adapter_dir)
    base = ae.resolve_base_model(adapter_config, settings["BASE_MODEL_ID"], adapter_dir)
    out = ae.resolve_path(settings["EXPORT_DIR"])
    recover_interrupted_publish(out, log)  # a killed swap: `out` holds a complete export again, old or new
    remove_stale_partials(out, log)  # what killed exports left beside it goes, whether or not this one is refused
    check_output_dir(out, settings["OVERWRITE"])

    try:
        fit = ae.check_adapter_fits_base(adapter_dir, base)
    except model_loader.ModelLoadError as error:
        raise ae.InputError(f"{error} (base model of {adapter_dir}; pass --base-model-id)") from None
    ae.check_run_tokenizer(adapter_dir, base)
    check_not_an_input(out, [adapter_dir, fit["base_path"]])
    frame = ae.read_prompt_frame(settings["PROMPT_PATH"], settings["SPLIT"], settings["VERIFY_PROMPTS"])
    prompts = frame["prompt"].tolist()

    start, seconds = time.time(), {}
    device = model_loader.pick_device()
    base_dir = local_checkpoint_dir(base)
    reader = CheckpointReader(base_dir)
    log(f"merging {adapter_dir} into {base} on {device} (bf16)")
    model, tokenizer = ae.load_adapted_model(adapter_dir, base, device=device, dtype=torch.bfloat16,
                                             experts_format="bf16")  # merge_and_unload needs the plain experts
    changed = lora_expert_parameters(model)
    model = model.merge_and_unload()
    seconds["load_and_merge"] = round(time.time() - start, 1)
    merged_logits = prompt_logits(model, tokenizer, prompts, settings["VERIFY_POSITIONS"])
    if not all(logits.isfinite().all() for logits in merged_logits):
        raise VerificationError(f"the merged model's logits are NaN or infinite on the verification prompts: the "
                                f"adapter {adapter_dir} is broken (its weights are far too large; a diverged "
                                f"training run?). Nothing was written to {out}. Export an earlier checkpoint "
                                "(--adapter-path <run>/checkpoint-<step>) or train again with a lower "
                                "--learning-rate")

    t = time.time()
    experts_format, packed, quantization = settings["EXPERTS_FORMAT"], None, None
    if experts_format == "mxfp4":
        packed = quantize_experts(model, set(changed), reader)
        quantization = expert_quantization_error(model, packed, reader, set(changed)) if changed else None
        load_quantized_experts(model, packed, set(changed))  # the in-memory model now holds exactly what is stored
        stored_logits = prompt_logits(model, tokenizer, prompts, settings["VERIFY_POSITIONS"])
    else:
        stored_logits = merged_logits  # nothing is rounded
    seconds["quantize"] = round(time.time() - t, 1)
    fidelity = measure_fidelity(experts_format, changed, quantization, compare_logits(merged_logits, stored_logits))
    sizes = export_sizes(model)
    lost = why_too_lossy(fidelity, settings)
    if lost and not settings["ALLOW_LOSSY"]:
        raise LossyExportError(
            f"MXFP4 rounding loses too much of what expert LoRA learned: {'; '.join(lost)}. Nothing was written to {out}. "
            f"Two ways on: --experts-format bf16 writes every weight exactly ({size_text(sizes['bf16_gib'])} instead "
            f"of {size_text(sizes['mxfp4_gib'])}), or --allow-lossy true writes the MXFP4 model anyway")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        t = time.time()
        config = add_converter_config_keys(json.loads((base_dir / "config.json").read_text()))
        if experts_format == "mxfp4":
            files = save_mxfp4_checkpoint(export_state_dict(model, packed), config, str(tmp_dir),
                                          max_shard_bytes=settings["MAX_SHARD_BYTES"])
        else:
            files = save_bf16_checkpoint(model, config, tmp_dir, settings["MAX_SHARD_BYTES"])
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp_dir / "generation_config.json")
        else:
            model.generation_config.save_pretrained(str(tmp_dir))
        for name in BASE_FILES:  # the base's licence terms travel with its derivative
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp_dir / name)
        tokenizer.save_pretrained(str(tmp_dir))
        seconds["write"] = round(time.time() - t, 1)
        del model, packed
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

        t = time.time()
        if experts_format == "mxfp4":
            check_mxfp4_checkpoint(str(tmp_dir))
        stored = compare_bytes(tmp_dir, reader, experts_format)
        reloaded = model_loader.load_model(str(tmp_dir), device=device, dtype=torch.bfloat16, experts_format="bf16")
        reloaded_logits = prompt_logits(reloaded, tokenizer, prompts, settings["VERIFY_POSITIONS"])
        del reloaded
        seconds["verify"] = round(time.time() - t, 1)
        logits = {"reloaded_vs_stored_precision": compare_logits(stored_logits, reloaded_logits),
                  "reloaded_vs_merged": compare_logits(merged_logits, reloaded_logits)}
        problems = []
        if not stored["same_names"]:
            problems.append(f"its tensor names differ from those a {experts_format} export of the base must have")
        if not changed and stored["expert_changed"]:
            problems.append(f"{len(stored['expert_changed'])} expert tensors differ from the base checkpoint's "
                            f"although the adapter has no expert LoRA (first: {stored['expert_changed'][0]})")
        if not all(x.isfinite().all() for x in reloaded_logits):
            problems.append("the reloaded export's logits are NaN or infinite")
        if not logits["reloaded_vs_stored_precision"]["max_rel_diff"] <= settings["LOGIT_TOLERANCE"]:  # NaN fails
            problems.append(f"reloaded logits differ from the merged model's by "
                            f"{logits['reloaded_vs_stored_precision']['max_rel_diff']:.2e} (relative), more than "
                            f"LOGIT_TOLERANCE={settings['LOGIT_TOLERANCE']}")
        seconds["total"] = round(time.time() - start, 1)
        report = {
            "fidelity": fidelity, "experts_format": experts_format, "size_gib": round(sizes[f"{experts_format}_gib"], 6),
            "export_dir": str(out), "adapter_path": str(adapter_dir), "base_model": base, "base_dir": str(base_dir),
            "adapter": {key: adapter_config.get(key)
                        for key in ("r", "lora_alpha", "target_modules", "target_parameters")},
            "expert_lora": bool(changed), "changed_expert_weights": changed,
            "files": files, "tensors": {k: (len(v) if isinstance(v, list) else v) for k, v in stored.items()},
            "experts_bit_identical_to_base": not stored["expert_changed"] if experts_format == "mxfp4" else None,
            "quantization_error": quantization, "logits": logits, "verify_prompts": len(prompts),
            "logit_tolerance": settings["LOGIT_TOLERANCE"], "verified": not problems, "problems": problems,
            "device": device if device == "cpu" else torch.cuda.get_device_name(), "dtype": "bfloat16",
            "seconds": seconds, "memory": memory_use(device),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__},
            "pushed_to": None,
        }
        ae.write_json(report, tmp_dir / REPORT_FILE)
        if problems:
            raise VerificationError(f"the export failed its check, {out} left as it was: " + "; ".join(problems))
        publish(tmp_dir, out)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(error, OSError):  # a full disk, a directory that became unwritable
            raise ExportError(f"writing the export failed ({error}); nothing was published to {out}") from None
        raise
    print_report(report, log)
    if hub:
        log(f"pushing {out} to the private Hub repo {hub[0]}")
        retry = (f"The export itself is complete and verified in {out} (see {REPORT_FILE}); push it when the Hub "
                 f"is reachable: hf upload {hub[0]} {out} --private (with HF_TOKEN set)")
        try:
            report["pushed_to"] = push_to_hub(out, *hub)
        except (OSError, HTTPError) as error:
            raise PushError(f"pushing to the Hub repo {hub[0]} failed ({type(error).__name__}: "
                            f"{ae.one_line(error)[:300]}). {retry}") from None
        except KeyboardInterrupt:
            raise PushError(f"interrupted while pushing to the Hub repo {hub[0]}. {retry}") from None
        ae.write_json(report, out / REPORT_FILE)
        log(f"pushed: {report['pushed_to']}")
    return report


def print_report(report, log):
    s, m, logits = report["seconds"], report["memory"], report["logits"]
    log(f"export {report['fidelity']['summary']}")
    experts = (f"expert tensors identical to the base: {report['tensors']['expert_identical']}, changed: "
               f"{report['tensors']['expert_changed']}" if report["experts_format"] == "mxfp4" else
               "experts written in bf16 as merged")
    log(f"wrote {report['export_dir']}: {report['experts_format']} experts, {size_text(report['size_gib'])} in "
        f"{len(report['files'])} shard(s); {experts}")
    stored = logits["reloaded_vs_stored_precision"]
    log(f"reloaded vs merged (stored precision): max |logit diff| {stored['max_abs_diff']:.3g}, "
        f"argmax agreement {stored['argmax_agreement']:.4f}")
    q = report["quantization_error"]
    if q:
        log(f"expert LoRA re-quantised to MXFP4: weight relative error max {q['weight_relative_error_max']:.3g}, "
            f"LoRA update relative error mean {q['update_relative_error_mean']:.3g}; reloaded vs merged before "
            f"rounding: max |logit diff| {logits['reloaded_vs_merged']['max_abs_diff']:.3g}, argmax agreement "
            f"{logits['reloaded_vs_merged']['argmax_agreement']:.4f}")
    log(f"time {s['total']:.1f} s (load+merge {s['load_and_merge']}, quantise {s['quantize']}, write {s['write']}, "
        f"verify {s['verify']}); peak CPU RSS {m['peak_cpu_rss_gib']:.2f} GiB"
        + (f", peak CUDA allocated {m['peak_cuda_allocated_gib']:.2f} GiB" if "peak_cuda_allocated_gib" in m else ""))


def main(argv=None):
    constants = {name: globals()[name] for name in SETTINGS}
    parser = script_settings.build_parser(__doc__, constants)
    parser.add_argument("--out", dest="export_dir", type=str, default=None, help="same as --export-dir")
    settings = script_settings.apply_flags(parser.parse_args(argv), constants)
    # the libraries, once the flags are read (--help and a wrong flag answer at once; importing them takes ~10 s)
    import model_loader
    from adapters import adapter_evaluation as ae

    try:
        return export(settings)
    except (ae.InputError, model_loader.ModelLoadError) as error:
        ae.fail(error)
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: nothing was published to {settings['EXPORT_DIR']} (an earlier export "
                         "there is left as it was)") from None


if __name__ == "__main__":
    main()
