"""Evaluate a LoRA adapter with the base kept in MXFP4, beside the dequantised (bf16) evaluation, and report deltas.

    python test_lora_adapter_quantized.py                         # newest run under runs/, held-out split
    python test_lora_adapter_quantized.py --adapter-path runs/grpo-tiny --max-prompts 100 --samples 4

Three evaluations of the same adapter on the same prompts and sampling seeds (test_lora_adapter.py's metrics):
1. reference: the base dequantised by model_loader (bf16 on a GPU, fp32 on a CPU) + the PEFT adapter, and the base
   alone (adapter disabled);
2. MXFP4 base + the PEFT adapter, and the MXFP4 base alone. transformers' own MXFP4 inference needs a CUDA GPU
   (compute capability >= 7.5), triton, the `kernels` package and OpenAI's triton kernels downloaded from the Hub
   at run time (kernels-community/gpt-oss-triton-kernels); the script probes for them and checks after loading
   that the experts really are MXFP4 modules (mode 'mxfp4-kernels'). Where they cannot run, and for an adapter
   with expert LoRA (adapter_config target_parameters), which PEFT cannot put on transformers' packed experts, the
   base keeps its experts in MXFP4 by this project's own path (gpu_engine/mxfp4_experts.py, mode 'mxfp4-experts'; an
   expert LoRA runs beside them as low-rank terms, gpu_engine/expert_lora.py): Triton kernels on a GPU, the plain-torch
   reference on a CPU, measured like any variant;
3. export: the adapter merged and the experts re-quantised to MXFP4 exactly as export_quantized_model.py writes them
   (simulated in the evaluation dtype: expert values as stored, other weights not rounded to bf16). Identical to the
   reference for attention-only adapters up to the merge's float rounding; with expert LoRA it shows what the
   quantisation costs.
Besides the sampled metrics it compares the logits of each variant with the reference on LOGIT_PROMPTS prompts.

Reads what test_lora_adapter.py reads; bad input ends with a one-line reason on stderr and exit code 2, nothing
written. Writes into ADAPTER_PATH (atomically): eval_quantized_report.json, eval_quantized_summary.md,
eval_quantized_action_counts.png (optimal versus chosen action for the three adapter variants).
"""

import gc
import importlib.util
import time

import script_settings
from output_files import write_text_atomically

# -----------------------------------------------------------------------------
ADAPTER_PATH = ""  # run directory holding adapter_config.json; '' = the newest under runs/
BASE_MODEL_ID = ""  # '' = the adapter's base_model_name_or_path; or a Hub id, a local model directory, 'tiny'
PROMPT_PATH = "data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"  # Harmony CSV with Q/rewards
SPLIT = "eval"  # rows of this `split` are evaluated ('' = every row): the held-out split by default
MAX_PROMPTS = 0  # evaluate N of those rows, spread evenly over them (0 = all)
SAMPLES = 4  # answers sampled per prompt and model
TEMPERATURE = 1.0  # sampling temperature (gpt-oss's recommended 1.0, as in training)
TOP_P = 1.0  # nucleus sampling (1.0 = off)
MAX_NEW_TOKENS = 256  # tokens an answer may use; one cut off there is invalid (training's MAX_COMPLETION_LEN)
BATCH_SIZE = 64  # sequences generated at once
SEED = 0  # seeds the sampling; every variant gets the same streams
LOGIT_PROMPTS = 4  # prompts whose logits are compared between the variants
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper()]
PREFIX = "eval_quantized"
KERNEL_REPO = "kernels-community/gpt-oss-triton-kernels"  # what transformers' MXFP4 integration downloads


def probe_mxfp4_kernels(device):
    """(True, what) when transformers can run MXFP4 experts natively here, else (False, why not)."""
    import torch
    from transformers.integrations.hub_kernels import get_kernel

    from adapters import adapter_evaluation as ae

    if device != "cuda":
        return False, ("no CUDA GPU: transformers runs MXFP4 experts only through OpenAI's triton kernels on a GPU; "
                       "on a CPU it dequantises them")
    if torch.cuda.get_device_capability() < (7, 5):
        return False, f"{torch.cuda.get_device_name()} has compute capability below 7.5, which the MXFP4 kernels need"
    for package in ("triton", "kernels"):
        if importlib.util.find_spec(package) is None:
            return False, (f"the `{package}` package is not installed (pip install {package}); transformers would "
                           "dequantise")
    try:
        get_kernel(KERNEL_REPO, version=1)
    except Exception as error:  # reported, not swallowed: it decides the mode and goes into the report
        return False, (f"the triton kernels ({KERNEL_REPO}) could not be loaded from the Hub or its cache "
                       f"({type(error).__name__}: {ae.one_line(error)[:200]})")
    return True, f"MXFP4 kernels from {KERNEL_REPO} on {torch.cuda.get_device_name()}"


def load_mxfp4_base(base, device):
    """(model, native): the base with its experts kept in MXFP4 (transformers' Mxfp4Config() without dequantize)."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    import model_loader

    model = AutoModelForCausalLM.from_pretrained(model_loader.resolve_model_id(base), dtype=torch.bfloat16,
                                                 attn_implementation="eager", device_map=device,
                                                 quantization_config=Mxfp4Config())
    native = any(type(m).__name__ == "Mxfp4GptOssExperts" for m in model.modules())
    return model, native


def release_memory():
    """Return freed tensors' memory now (call after `del`): two copies of a 20b model do not fit one GPU."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    constants = {name: globals()[name] for name in SETTINGS}
    settings = script_settings.apply_flags(script_settings.build_parser(__doc__, constants).parse_args(argv),
                                           constants)
    # the libraries, once the flags are read (--help and a wrong flag answer at once; importing them takes ~10 s)
    from peft import PeftModel

    import model_loader
    from adapters import adapter_evaluation as ae
    from adapters.adapter_merge import (CheckpointReader, compare_logits, expert_quantization_error,
                                        load_quantized_experts, local_checkpoint_dir, lora_expert_parameters,
                                        prompt_logits, quantize_experts)
    from training import evaluation

    try:
        adapter_dir, adapter_config, base, frame, fit = ae.check_inputs(settings)
        ae.check_writable(adapter_dir)
    except ae.InputError as error:
        ae.fail(error)

    start = time.time()
    device = model_loader.pick_device()
    expert_targets = ae.expert_lora_targets(adapter_config)
    prompts = frame["prompt"].tolist()[:settings["LOGIT_PROMPTS"]]
    kwargs = ae.decoding_settings(settings)

    ae.log(f"1/3 reference: {adapter_dir} on the dequantised base {base} ({device})")
    try:
        model, tokenizer = ae.load_adapted_model(adapter_dir, base, device=device, experts_format="bf16")
        ae.check_adapter_output(model, tokenizer, prompts[0], adapter_dir)
    except (ae.InputError, model_loader.ModelLoadError) as error:
        ae.fail(error)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    reference, reference_actions, _ = ae.evaluate_base_and_adapter(model, tokenizer, frame, settings)
    with model.disable_adapter():
        logits = {"base": prompt_logits(model, tokenizer, prompts)}
    logits["adapter"] = prompt_logits(model, tokenizer, prompts)

    available, why = probe_mxfp4_kernels(device)
    if available and expert_targets:
        available, why = False, (f"not used: PEFT cannot put the adapter's expert LoRA ({', '.join(expert_targets)}) "
                                 f"on transformers' packed experts ({why})")
    del model
    release_memory()
    mx_model, mx_base, mode = None, None, "mxfp4-kernels"
    if available:
        ae.log(f"2/3 MXFP4 base: {why}")
        mx_base, native = load_mxfp4_base(base, device)
        if native:
            mx_model = PeftModel.from_pretrained(mx_base, str(adapter_dir))
        else:
            why = "transformers fell back to dequantising the experts while loading (see its warning above)"
            mx_base = None
            release_memory()
    if mx_model is None:
        # transformers' kernels are out of reach (or cannot hold the adapter), this project's are not: the base's
        # experts kept as stored, an expert LoRA beside them as low-rank terms
        mode = "mxfp4-experts"
        ae.log(f"2/3 MXFP4 base: experts kept in MXFP4 by gpu_engine/mxfp4_experts.py (transformers' own kernels: "
               f"{why.split(':')[0]})")
        mx_model, _ = ae.load_adapted_model(adapter_dir, base, device=device, experts_format="mxfp4")
    mx_model.eval()
    mxfp4, mxfp4_actions, _ = ae.evaluate_base_and_adapter(mx_model, tokenizer, frame, settings)
    with mx_model.disable_adapter():
        mxfp4_logits = {"base": prompt_logits(mx_model, tokenizer, prompts)}
    mxfp4_logits["adapter"] = prompt_logits(mx_model, tokenizer, prompts)
    del mx_model, mx_base  # both hold the MXFP4 model: the reference is loaded again next
    release_memory()
    model, tokenizer = ae.load_adapted_model(adapter_dir, base, device=device, experts_format="bf16")  # to merge
    reader = CheckpointReader(local_checkpoint_dir(base))
    ae.log("3/3 export: adapter merged, experts re-quantised to MXFP4 as export_quantized_model.py writes them")
    changed = set(lora_expert_parameters(model))
    merged = model.merge_and_unload()
    packed = quantize_experts(merged, changed, reader)
    quantization = expert_quantization_error(merged, packed, reader, changed) if changed else None
    load_quantized_experts(merged, packed, changed)
    export_scores, _, export_actions = evaluation.evaluate_model(merged, tokenizer, frame, log=ae.log, **kwargs)
    export_logits = prompt_logits(merged, tokenizer, prompts)

    delta = {"mxfp4_base": ae.compare_scores(reference["base"], mxfp4["base"], reference_actions["base"],
                                             mxfp4_actions["base"]),
             "mxfp4_adapter": ae.compare_scores(reference["adapter"], mxfp4["adapter"], reference_actions["adapter"],
                                                mxfp4_actions["adapter"]),
             "export_adapter": ae.compare_scores(reference["adapter"], export_scores, reference_actions["adapter"],
                                                 export_actions)}
    logit_delta = {"mxfp4_base": compare_logits(logits["base"], mxfp4_logits["base"]),
                   "mxfp4_adapter": compare_logits(logits["adapter"], mxfp4_logits["adapter"]),
                   "export_adapter": compare_logits(logits["adapter"], export_logits)}
    plots = {"action_counts": f"{PREFIX}_action_counts.png"}
    ae.plot_action_counts([(f"reference adapter ({dtype})", reference["adapter"]["optimal_vs_predicted"]),
                           ("MXFP4 base + adapter", mxfp4["adapter"]["optimal_vs_predicted"]),
                           ("export: merged, MXFP4 experts", export_scores["optimal_vs_predicted"])],
                          adapter_dir / plots["action_counts"],
                          f"{len(frame)} held-out prompts x {settings['SAMPLES']} answers, same seeds")
    report = {
        "adapter_path": str(adapter_dir), "base_model": base, "adapter_fit": fit,
        "adapter": {key: adapter_config.get(key) for key in ("r", "lora_alpha", "target_modules", "target_parameters")},
        "expert_lora": expert_targets,
        "mode": mode,
        "mxfp4_kernels": {"available": mode == "mxfp4-kernels", "reason": why},
        "what_was_done": describe(mode, why, expert_targets, dtype),
        "prompt_path": str(ae.resolve_path(settings["PROMPT_PATH"])), "split": settings["SPLIT"],
        "prompts": len(frame), "decoding": kwargs, "logit_prompts": len(prompts),
        "reference": {"dtype": dtype, "base": reference["base"], "adapter": reference["adapter"]},
        "mxfp4": {"base": mxfp4["base"], "adapter": mxfp4["adapter"]},
        "export": {"adapter": export_scores, "changed_expert_weights": sorted(changed),
                   "expert_update_kept": quantization["update_kept"] if quantization else None,
                   "quantization_error": quantization},
        "delta": delta, "logits": logit_delta,
        "references": evaluation.reference_scores(frame), "plots": plots,
        "device": device, "seconds": round(time.time() - start, 1), "settings": settings,
    }
    ae.write_json(report, adapter_dir / f"{PREFIX}_report.json")
    summary = render_summary(report)

    write_text_atomically(summary, adapter_dir / f"{PREFIX}_summary.md")
    print(summary)
    ae.log(f"wrote {PREFIX}_report.json, {PREFIX}_summary.md and {plots['action_counts']} into {adapter_dir} "
           f"({report['seconds']:.0f} s)")
    return report


def describe(mode, why, expert_targets, dtype):
    """One paragraph saying plainly what was run."""
    if mode == "mxfp4-kernels":
        text = f"Ran the base with MXFP4 experts on the GPU kernels ({why}) against the dequantised {dtype} base."
    else:
        text = (f"transformers' MXFP4 kernels did not run here ({why}), so the base ran with its experts kept in "
                "MXFP4 by this project's own path (gpu_engine/mxfp4_experts.py: Triton kernels on a GPU, the plain-torch "
                f"reference on a CPU) against the dequantised {dtype} base: the deltas are measured, not assumed.")
        if expert_targets:
            text += (" The adapter's expert LoRA ran beside the packed experts as low-rank terms (gpu_engine/expert_lora.py), "
                     "unrounded.")
    return text + " The export variant merges the adapter and rounds the experts to MXFP4 as the exporter stores them."


def render_summary(report):
    from adapters import adapter_evaluation as ae

    r, m, e, d, lg = report["reference"], report["mxfp4"], report["export"], report["delta"], report["logits"]
    lines = [f"# Adapter evaluation with an MXFP4 base: {report['adapter_path']}", "",
             f"Base `{report['base_model']}`; {report['prompts']} prompts x {report['decoding']['samples']} answers, "
             f"same prompts and seeds for every variant. Mode: **{report['mode']}**.", "", report["what_was_done"], ""]
    lines += ae.scores_table([(f"reference base ({r['dtype']})", r["base"]),
                              (f"reference adapter ({r['dtype']})", r["adapter"]),
                              ("MXFP4 base", m["base"]), ("MXFP4 base + adapter", m["adapter"]),
                              ("export (merged, MXFP4 experts)", e["adapter"])], report["references"])
    lines += ["", "| variant minus its reference | valid rate | accuracy | mean reward | mean regret | same action | "
              "max abs logit diff | argmax agreement |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("mxfp4_base", "MXFP4 base"), ("mxfp4_adapter", "MXFP4 base + adapter"),
                       ("export_adapter", "export")):
        x, g = d[key], lg[key]
        lines.append(f"| {label} | {ae.fmt(x['valid_rate'], True)} | {ae.fmt(x['accuracy'], True)} | "
                     f"{ae.fmt(x['mean_reward'], True)} | {ae.fmt(x['mean_regret'], True)} | "
                     f"{100 * x['same_action_rate']:.1f}% | {g['max_abs_diff']:.3g} | {g['argmax_agreement']:.4f} |")
    if e["changed_expert_weights"]:
        x = d["export_adapter"]
        kept = e["expert_update_kept"]
        lines += ["", f"Export round trip (expert LoRA rounded to MXFP4): {'?' if kept is None else f'{kept:.0%}'} of "
                  f"the expert update kept; held-out mean reward {ae.fmt(x['mean_reward'], True)}, valid rate "
                  f"{ae.fmt(x['valid_rate'], True)}, same action as the adapter {100 * x['same_action_rate']:.1f}%, "
                  f"argmax agreement {lg['export_adapter']['argmax_agreement']:.4f} (export minus adapter)."]
    lines += ["", f"Plot: `{report['plots']['action_counts']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
