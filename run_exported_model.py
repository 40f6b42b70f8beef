"""Generate from a merged model (an export directory or a Hub id) and print each answer and the action it chooses.

    python run_exported_model.py                                   # runs/export/gpt-oss-tes, 5 held-out prompts
    python run_exported_model.py --model-path runs/export/tiny --max-prompts 10 --seed 1
    python run_exported_model.py --model-path you/gpt-oss-tes      # the pushed export (needs Hub access)

Loads MODEL_PATH through model_loader (EXPERTS_FORMAT: an MXFP4 export's experts kept as stored on a GPU,
dequantised on a CPU), renders nothing itself: the prompts of PROMPT_PATH are already Harmony. For each prompt it
prints the situation, the model's analysis and final message, the action parsed from the final message exactly as
the training reward parses it (harmony.parse_final_action; 'invalid' when there is none) and the best action by Q;
then how many answers were valid and optimal. Reads MODEL_PATH and PROMPT_PATH, writes nothing. Bad input (a missing
export directory, a prompt file without the needed columns) ends with a one-line reason on stderr and exit code 2.
"""

import re
import time

import harmony
import script_settings
from data_reward import optimal_actions, q_matrix
from export_quantized_model import EXPORT_DIR

# -----------------------------------------------------------------------------
MODEL_PATH = EXPORT_DIR  # export directory (export_quantized_model.py's default output) or a Hub id
EXPERTS_FORMAT = "auto"  # mxfp4: the experts kept as exported (a 24 GB card); bf16: dequantised on load; auto: mxfp4
                         #   on a GPU for an MXFP4 export, else bf16 (fp32 on a CPU)
PROMPT_PATH = "data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"  # Harmony CSV with Q/rewards
SPLIT = "eval"  # prompts come from this `split` ('' = every row): the held-out split by default
MAX_PROMPTS = 5  # prompts answered, spread evenly over the split (0 = all)
TEMPERATURE = 1.0  # sampling temperature (gpt-oss's recommended 1.0)
TOP_P = 1.0  # nucleus sampling (1.0 = off)
MAX_NEW_TOKENS = 256  # tokens an answer may use; one cut off there is invalid
SEED = 0  # seeds the sampling
# -----------------------------------------------------------------------------
SETTINGS = [name for name in list(globals()) if name.isupper() and name != "EXPORT_DIR"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


def resolve_model(model_path):
    """A local export directory, or a Hub id; InputError for a local path that does not exist."""
    from adapters import adapter_evaluation as ae

    path = ae.resolve_path(model_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ae.InputError(f"{path}: no config.json; is it an export directory (python "
                                "export_quantized_model.py)?")
        return str(path)
    if HUB_ID.match(model_path) and not ae.resolve_path(model_path.split("/")[0]).exists():
        return model_path
    raise ae.InputError(f"{path}: no such model directory; export one first (python export_quantized_model.py) "
                        "or pass --model-path with an export directory or a Hub id")


def user_message(prompt):
    """The situation text of a Harmony prompt (its user message)."""
    match = re.search(r"<\|start\|>user<\|message\|>(.*?)<\|end\|>", prompt, re.DOTALL)
    return match[1].strip() if match else prompt


def check_model_output(model, tokenizer, prompt, model_id):
    """InputError when the model's logits on `prompt` are not all finite: sampling from them is meaningless (and
    torch.multinomial fails on them)."""
    from adapters import adapter_evaluation as ae

    if not ae.has_finite_output(model, tokenizer, prompt):
        raise ae.InputError(f"{model_id}: the model's logits are NaN or infinite, so it cannot answer; its weights "
                            "are broken (an export from a diverged run?): export again from a good adapter "
                            "(export_quantized_model.py --adapter-path <run>/checkpoint-<step>)")


def main(argv=None):
    constants = {name: globals()[name] for name in SETTINGS}
    settings = script_settings.apply_flags(script_settings.build_parser(__doc__, constants).parse_args(argv),
                                           constants)
    # the libraries, once the flags are read (--help and a wrong flag answer at once; importing them takes ~10 s)
    import model_loader
    from adapters import adapter_evaluation as ae
    from gpu_engine.mxfp4 import CheckpointError
    from training.evaluation import generate_answers

    try:
        ae.check_settings(settings)
        model_id = resolve_model(settings["MODEL_PATH"])
        frame = ae.read_prompt_frame(settings["PROMPT_PATH"], settings["SPLIT"], settings["MAX_PROMPTS"])
        start = time.time()
        tokenizer = model_loader.load_tokenizer(model_id)  # first: it fails in a second, the model in minutes
        model = model_loader.load_model(model_id, experts_format=settings["EXPERTS_FORMAT"])
        check_model_output(model, tokenizer, frame["prompt"].iat[0], model_id)
    except (ae.InputError, model_loader.ModelLoadError, CheckpointError) as error:
        ae.fail(error)

    ae.log(f"loaded {model_id} in {time.time() - start:.0f} s; answering {len(frame)} prompts")
    answers = generate_answers(model, tokenizer, frame["prompt"].tolist(), samples=1,
                               temperature=settings["TEMPERATURE"], top_p=settings["TOP_P"],
                               max_new_tokens=settings["MAX_NEW_TOKENS"], seed=settings["SEED"])
    q, best = q_matrix(frame), optimal_actions(frame)
    valid = optimal = 0
    for i, (row_answers, prompt) in enumerate(zip(answers, frame["prompt"])):
        answer = row_answers[0]
        action = harmony.parse_final_action(answer, q.shape[1])
        messages = {channel: content for channel, content, _ in harmony.split_messages(answer)}
        valid += action is not None
        optimal += action == best[i]
        print(f"\n--- prompt {i + 1}/{len(frame)} (row {frame['row_id'].iat[i] if 'row_id' in frame else i})")
        print(user_message(prompt))
        print(f"analysis: {messages.get('analysis', '').strip() or '(none)'}")
        print(f"final:    {messages.get('final', '').strip() or '(none)'}")
        print(f"action:   {'invalid' if action is None else f'[{action}]'}   best by Q: [{best[i]}]   "
              f"Q: {', '.join(f'{v:.3f}' for v in q[i])}")
    print(f"\n{valid}/{len(frame)} valid answers, {optimal}/{len(frame)} chose the best action by Q")


if __name__ == "__main__":
    main()
