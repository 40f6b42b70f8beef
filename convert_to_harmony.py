"""Render the legacy-text prompts of data CSVs as Harmony prompts, through the model's own chat template.

    python convert_to_harmony.py data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv --date 2025-05-05
    python convert_to_harmony.py a.csv b.csv --model-id openai/gpt-oss-20b --reasoning-effort medium

For each input `<name>.csv` it writes `<name>_harmony.csv` beside it: the `prompt` column becomes
system message + developer instructions (harmony.DEVELOPER_INSTRUCTIONS) + user turn, ending where the assistant
starts (`<|start|>assistant`); every other column is kept as it was. The gpt-oss template stamps a
'Current date' into the system message: `--date` pins it (reproducible files need it; the committed data uses the
data's first day, 2025-05-05); without it the date is today's, as the template itself would write.

--model-id defaults to `tiny`, the embedded stand-in's tokenizer (it carries the original gpt-oss template, which
ships inside trl, so this works offline); `openai/gpt-oss-20b` uses the real tokenizer where the Hub is reachable.
Both render the same text: the template is the same. A file whose prompts are already Harmony is refused.
Bad input (no data rows, an empty prompt, a prompt holding a Harmony marker such as <|end|> or a control character,
a Q value that is not a finite number, an output path that cannot be written, ...) exits with status 2 and a message
naming the file and row; nothing is written unless every file is good.
"""

import argparse
import sys
from pathlib import Path

import harmony
from data_reward import FIRST_DATA_ROW, PROMPT_COLUMN, DataError, list_row_problems, read_data_csv, validate_data_files
from output_files import why_not_writable, write_csv_atomically

# -----------------------------------------------------------------------------
MODEL_ID = "tiny"  # whose chat template renders the prompts: 'tiny', a local model directory or a Hub id
REASONING_EFFORT = "low"  # the system message's 'Reasoning:' line: low | medium | high
DATE = "today"  # the system message's 'Current date:', YYYY-MM-DD or 'today'
SUFFIX = "_harmony"  # output file: <name><SUFFIX>.csv beside the input
# -----------------------------------------------------------------------------


def output_path(path):
    path = Path(path)
    return path.with_name(path.stem + SUFFIX + path.suffix)


def check_convertible(path, frame):
    """Refuse a file that was converted already (rendering it twice would nest one Harmony prompt in another), a
    file without rows, empty prompts, and an output path that cannot be written."""
    if Path(path).stem.endswith(SUFFIX):
        raise DataError(f"{path}: this is a converted file already ({SUFFIX}.csv); convert the original instead")
    if frame.empty:
        raise DataError(f"{path}: the header has no data rows below it; nothing to convert")
    empty = (frame[PROMPT_COLUMN].str.strip() == "").to_numpy().nonzero()[0]
    if len(empty):
        raise DataError("\n".join(list_row_problems(path, empty, lambda row: f"{PROMPT_COLUMN} is empty; write the "
                                                                           "situation or drop the row")))
    converted = frame[PROMPT_COLUMN].map(harmony.is_harmony_prompt)
    if converted.any():
        row = int(converted.to_numpy().nonzero()[0][0]) + FIRST_DATA_ROW
        raise DataError(f"{path}:{row}: the prompt is already a Harmony prompt; convert the legacy-text file instead")
    reason = why_not_writable(output_path(path))
    if reason:
        raise DataError(f"cannot write the output of {path}: {reason}")


def convert_frame(frame, tokenizer, reasoning_effort, date):
    """A copy of `frame` whose prompt column holds the rendered Harmony prompts."""
    converted = frame.copy()
    converted[PROMPT_COLUMN] = [harmony.render_prompt(tokenizer, p, reasoning_effort, date) for p in frame[PROMPT_COLUMN]]
    return converted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", help="legacy-text data CSV(s)")
    parser.add_argument("--model-id", default=MODEL_ID, help=f"tokenizer with the chat template (default {MODEL_ID})")
    parser.add_argument("--reasoning-effort", default=REASONING_EFFORT, choices=harmony.REASONING_EFFORTS)
    parser.add_argument("--date", default=DATE, help="YYYY-MM-DD to pin the system message's date, or 'today'")
    args = parser.parse_args(argv)
    import model_loader  # once the flags are read: --help answers at once, transformers takes seconds to import

    try:
        date = harmony.parse_date(args.date)
        frames = {}
        for path in args.csv:
            frames[path] = read_data_csv(path)  # as text: every column but the prompt is written back unchanged
            check_convertible(path, frames[path])
        # the data contract every script checks (finite Q values, safe prompt text), with the same messages
        validate_data_files(args.csv, require_rewards=False, same_action_count=False)
    except (DataError, ValueError) as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2

    try:
        tokenizer = model_loader.load_tokenizer(args.model_id)
    except model_loader.ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, frame in frames.items():
        try:
            write_csv_atomically(convert_frame(frame, tokenizer, args.reasoning_effort, date), output_path(path))
        except OSError as error:  # checked above, so only a full disk or a directory that just changed
            print(f"error: cannot write {output_path(path)} ({error.strerror})", file=sys.stderr)
            return 2
        print(f"wrote {output_path(path)} ({len(frame)} prompts, reasoning {args.reasoning_effort}, date {date})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
