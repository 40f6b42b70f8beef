"""Evaluate a trained LoRA adapter against its base model on held-out prompts.

    python test_lora_adapter.py                                   # newest run under runs/, held-out split
    python test_lora_adapter.py --adapter-path runs/grpo-tiny --samples 8 --max-prompts 100
    python test_lora_adapter.py --base-model-id /models/gpt-oss-20b   # another copy of the base it was trained on

Loads the base model through model_loader (EXPERTS_FORMAT: MXFP4 experts kept as stored on a GPU, dequantised to
fp32 on a CPU) with the PEFT adapter on top, samples SAMPLES answers per prompt, parses them exactly as the training
reward does (harmony.parse_final_action via training/evaluation.py) and scores them; then the same for the base model
alone (`model.disable_adapter()`), on the same prompts with the same sampling seeds. Reported per model: valid-answer
rate, accuracy against argmax Q, mean Boltzmann reward, mean regret in Q units, the action distribution and a
predicted-versus-optimal count table, beside uniform guessing, the best constant action and the optimal policy.

Reads: ADAPTER_PATH (adapter_config.json, adapter_model.safetensors, tokenizer if saved, trainer_state.json
if present), the base model, PROMPT_PATH. Everything is checked before a model is loaded; bad input ends with a
one-line reason on stderr and exit code 2, nothing written.
Writes into ADAPTER_PATH (each file atomically): eval_report.json, eval_summary.md, eval_answers.csv (every
answer), eval_training_curve.png (reward, valid rate and accuracy per training step from trainer_state.json),
eval_action_counts.png (optimal versus chosen action, base and adapter).
"""

import platform
import time

import script_settings
from output_files import write_text_atomically

# -----------------------------------------------------------------------------
ADAPTER_PATH = ""  # run directory holding adapter_config.json; '' = the newest under runs/
BASE_MODEL_ID = ""  # '' = the adapter's base_model_name_or_path; or a Hub id, a local model directory, 'tiny'
EXPERTS_FORMAT = "auto"  # mxfp4: the base's experts kept as stored (a 24 GB card; an expert LoRA runs beside them as
                         #   low-rank terms); bf16: dequantised; auto: mxfp4 on a GPU, bf16 (fp32) on a CPU
PROMPT_PATH = "data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"  # Harmony CSV with Q/rewards
SPLIT = "eval"  # rows of this `split` are evaluated ('' = every row): the held-out split by default
MAX_PROMPTS = 0  # evaluate N of those rows, spread evenly over them (0 = all)
SAMPLES = 4  # answers sampled per prompt and model
TEMPERATURE = 1.0  # sampling temperature (gpt-oss's recommended 1.0, as in training)
TOP_P = 1.0  # nucleus sampling (1.0 = off)
MAX_NEW_TOKENS = 256  # tokens an answer may use; one cut off there is invalid (training's MAX_COMPLETION_LEN)
BATCH_SIZE = 64  # sequences generated at once
SEED = 0  # seeds the sampling; both models get the same streams
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper()]
PREFIX = "eval"  # file names written into the run directory start with this


def main(argv=None):
    constants = {name: globals()[name] for name in SETTINGS}
    settings = script_settings.apply_flags(script_settings.build_parser(__doc__, constants).parse_args(argv),
                                           constants)
    # the libraries, once the flags are read (--help and a wrong flag answer at once; importing them takes ~10 s)
    import torch

    import model_loader
    from adapters import adapter_evaluation as ae
    from training import evaluation

    try:
        adapter_dir, adapter_config, base, frame, fit = ae.check_inputs(settings)
        ae.check_writable(adapter_dir)
    except ae.InputError as error:
        ae.fail(error)

    start = time.time()
    device = model_loader.pick_device()
    ae.log(f"adapter {adapter_dir} on base {base} ({device}); {len(frame)} prompts from {settings['PROMPT_PATH']}")
    try:
        model, tokenizer = ae.load_adapted_model(adapter_dir, base, device=device,
                                                 experts_format=settings["EXPERTS_FORMAT"])
        ae.check_adapter_output(model, tokenizer, frame["prompt"].iat[0], adapter_dir)
    except (ae.InputError, model_loader.ModelLoadError) as error:
        ae.fail(error)
    scores, actions, answers = ae.evaluate_base_and_adapter(model, tokenizer, frame, settings)

    training_rows = ae.read_training_log(adapter_dir)
    plots = {"training_curve": None, "action_counts": f"{PREFIX}_action_counts.png"}
    if training_rows:
        plots["training_curve"] = f"{PREFIX}_training_curve.png"
        ae.plot_training_curve(training_rows, adapter_dir / plots["training_curve"],
                               f"GRPO training of {adapter_dir.name} ({len(training_rows)} logged steps)")
    ae.plot_action_counts([("base (adapter disabled)", scores["base"]["optimal_vs_predicted"]),
                           ("adapter", scores["adapter"]["optimal_vs_predicted"])],
                          adapter_dir / plots["action_counts"],
                          f"{len(frame)} held-out prompts x {settings['SAMPLES']} answers")
    report = {
        "adapter_path": str(adapter_dir),
        "base_model": base,
        "adapter": {key: adapter_config.get(key) for key in ("r", "lora_alpha", "target_modules", "target_parameters")},
        "adapter_fit": fit,
        "prompt_path": str(ae.resolve_path(settings["PROMPT_PATH"])),
        "split": settings["SPLIT"],
        "prompts": len(frame),
        "decoding": ae.decoding_settings(settings),
        "models": {"base": scores["base"], "adapter": scores["adapter"]},
        "delta": ae.compare_scores(scores["base"], scores["adapter"], actions["base"], actions["adapter"]),
        "gain": evaluation.paired_gain(frame, actions["base"], actions["adapter"], seed=settings["SEED"]),
        "references": evaluation.reference_scores(frame),
        "training": ae.summarize_training_log(training_rows),
        "plots": plots,
        "answers_file": f"{PREFIX}_answers.csv",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "experts_format": model_loader.experts_format_of(model),
        "seconds": round(time.time() - start, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__},
        "settings": settings,
    }
    ae.write_answers(frame, actions, answers, adapter_dir / report["answers_file"])
    ae.write_json(report, adapter_dir / f"{PREFIX}_report.json")
    summary = ae.render_evaluation_summary(report)

    write_text_atomically(summary, adapter_dir / f"{PREFIX}_summary.md")
    print(summary)
    ae.log(f"wrote {PREFIX}_report.json, {PREFIX}_summary.md, {PREFIX}_answers.csv and plots into {adapter_dir} "
           f"({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
