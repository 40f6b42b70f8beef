"""The data contract of the TES control task: columns, validation, Boltzmann rewards.

This module holds what every stage agrees on about a data CSV; training/rewards.py scores a completion against a row,
training/completion_log.py records it, output_files.py writes files whole.

A data CSV has one row per situation and at least these columns:
    prompt                       the situation in plain English (text, never empty)
    q_action_0 .. q_action_<n-1> the value of each action, higher is better (finite numbers)
    reward_action_0 .. _<n-1>    softmax(Q / tau) per row, written by calculate_reward.py
                                 (each row sums to 1; required for training, not for computing them)
Any number n >= 1 of actions works; the indices must run 0..n-1 without gaps. Other columns
(row_id, split, timestamp, ...) are carried along untouched.

Row numbers in every error message count as a spreadsheet does: the header is row 1, the first
data row is row 2 (also the line number in a text editor when no prompt spans several lines).
Messages have the form `file:row: what is wrong`; problems with a whole file read `file: ...`.

    import data_reward
    frames = data_reward.validate_data_files(["data/x.csv"])   # raises DataError listing problems
    best = data_reward.optimal_actions(frames[Path("data/x.csv")])
"""
import codecs
import csv
import importlib.util
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from harmony import is_harmony_prompt, why_not_rendered_prompt, why_unsafe_text

# ------------------------------------------------------------------------------------------------
Q_PREFIX = "q_action_"  # Q-value columns: q_action_0 .. q_action_<n-1>
REWARD_PREFIX = "reward_action_"  # Boltzmann reward columns written by calculate_reward.py
PROMPT_COLUMN = "prompt"  # the text the policy model reads
REWARD_SUM_TOLERANCE = 1e-6  # a row's rewards may miss 1 by this much (they are stored rounded)
MAX_ROWS_LISTED = 20  # rows listed per file and problem; the rest are counted, so a broken
#                       million-row file gives a readable message rather than a million lines
FIRST_DATA_ROW = 2  # spreadsheet numbering: the header is row 1
QUOTED_FIELD = re.compile(r'"[^"]*"')  # a quoted field, or one piece of it around a doubled quote
LINE_ENDING = re.compile(r"(\r\n|\n|\r)")  # the line endings the csv module and pandas accept
# pyarrow's CSV reader is about 4x faster than pandas' own and gives the same text here (the field
# counts are checked before either reads); pandas' reader is the fallback where pyarrow is missing
CSV_ENGINE = "pyarrow" if importlib.util.find_spec("pyarrow") else "c"
# ------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad data: the message lists every problem, one per line, as `file:row: what is wrong`."""


def check_tau(tau):
    """Raise ValueError unless tau is a finite number greater than 0 (the Boltzmann temperature)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)):
        raise ValueError(f"--tau must be a number, got {tau!r}; the usual value is 0.05")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"--tau must be a finite number greater than 0, got {tau!r}; "
                         "the usual value is 0.05")


def find_action_columns(columns, prefix=Q_PREFIX):
    """Return the columns named <prefix><i>, sorted by i; i must run 0..n-1 with n >= 1.

    >>> find_action_columns(["prompt", "q_action_1", "q_action_0"])
    ['q_action_0', 'q_action_1']
    """
    found = {}
    malformed = []
    for name in columns:
        name = str(name)
        if not name.startswith(prefix):
            continue
        suffix = name[len(prefix):]
        # "q_action_01" would silently alias q_action_1 in the reward column names: refuse it
        if re.fullmatch(r"0|[1-9][0-9]*", suffix) is None:
            malformed.append(name)
        else:
            found[int(suffix)] = name
    problems = []
    if malformed:
        problems.append(f"column(s) {', '.join(malformed)} start with {prefix!r} but do not end in "
                        f"an action index like {prefix}0; rename or remove them")
    if not found and not malformed:
        problems.append(f"no {prefix}<i> columns; expected {prefix}0, {prefix}1, ...")
    missing = sorted(set(range(max(found) + 1)) - set(found)) if found else []
    if missing:
        problems.append(f"{prefix}<i> columns must run 0..n-1 without gaps; missing "
                        f"{', '.join(prefix + str(i) for i in missing)}")
    if problems:
        raise DataError("\n".join(problems))
    return [found[i] for i in sorted(found)]


def boltzmann_rewards(q, tau):
    """Return softmax(q / tau) along each row: the Boltzmann reward of every action.

    q: (rows, actions) finite numbers; tau > 0. Subtracting the row maximum first keeps every
    exponent <= 0, so no Q scale or tiny tau (1e-12) overflows; the best action's weight is
    exactly exp(0) = 1 before normalising, so the sum never underflows to 0 either.

    >>> boltzmann_rewards(np.array([[0.0, 0.0]]), 0.05).tolist()
    [[0.5, 0.5]]
    """
    check_tau(tau)
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] == 0:
        raise ValueError(f"q must be a 2-D array (rows, actions) with at least one action, "
                         f"got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("q holds NaN or infinite values; validate the data first")
    # q - max can overflow to -inf for |Q| near 1e308, /tau can too, and exp can underflow to 0:
    # each just means weight 0
    with np.errstate(over="ignore", under="ignore"):
        weights = np.exp((q - q.max(axis=1, keepdims=True)) / tau)
    return weights / weights.sum(axis=1, keepdims=True)


def q_matrix(df, prefix=Q_PREFIX):
    """Return the (rows, actions) float array of the <prefix><i> columns, in action order."""
    return df[find_action_columns(df.columns, prefix)].to_numpy(dtype=np.float64)


def reward_matrix(df):
    """Return the (rows, actions) float array of the reward_action_<i> columns."""
    return q_matrix(df, REWARD_PREFIX)


def optimal_actions(df):
    """Return the index of the highest Q per row (the first one on a tie)."""
    return np.argmax(q_matrix(df), axis=1)


def split_records(text, path):
    """Return (bodies, endings): the raw records of CSV text and the line ending after each.

    A record ends at a line ending outside quotes. Quotes inside a quoted field are doubled, so a
    line with an odd number of quote characters leaves a field open into the next line. The text
    after the last line ending, if any, is a last record with ending "". Raises DataError when a
    quote is never closed.
    """
    if text.count("\r") == text.count("\r\n"):  # "\n" or "\r\n" endings: split in C, fast
        lines = text.split("\n")
        endings = ["\r\n" if line.endswith("\r") else "\n" for line in lines]
        lines = [line[:-1] if ending == "\r\n" else line for line, ending in zip(lines, endings)]
    else:  # a lone "\r" somewhere: old Mac endings, or one inside a quoted field
        parts = LINE_ENDING.split(text)
        lines, endings = parts[0::2], parts[1::2] + [""]
    endings[-1] = ""
    if lines[-1] == "":  # the text ended with a line ending
        lines.pop()
        endings.pop()
    if not any(line.count('"') % 2 for line in lines):
        return lines, endings
    bodies, record_endings, open_body = [], [], None
    for line, ending in zip(lines, endings):
        odd = line.count('"') % 2
        if open_body is None and not odd:
            bodies.append(line)
            record_endings.append(ending)
        elif open_body is None:
            open_body = line + ending
        elif odd:
            bodies.append(open_body + line)
            record_endings.append(ending)
            open_body = None
        else:
            open_body += line + ending
    if open_body is not None:
        raise DataError(f"{path}:{len(bodies) + 1}: a quoted field opened in this row is never "
                        "closed; fix the quote characters")
    return bodies, record_endings


def count_fields(text, path):
    """Return the number of fields of every record of CSV text, header first.

    Quoted fields are cut out first (one regex pass: a doubled quote inside one splits it into two
    quoted pieces, both cut), which leaves only the separating commas and the record-ending line
    breaks. Raises DataError, naming the row, for a quote that is never closed.
    """
    unquoted = QUOTED_FIELD.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    stray = unquoted.find('"')
    if stray >= 0:
        row = unquoted.count("\n", 0, stray) + 1
        raise DataError(f"{path}:{row}: a quote character in this row is never closed; fix the "
                        "quote characters")
    lines = unquoted.split("\n")
    if lines[-1] == "":  # the text ended with a line ending
        lines.pop()
    return [line.count(",") + 1 for line in lines]


def read_data_csv(path):
    """Read a data CSV with every column as text, exactly as written (nothing becomes NaN).

    Numbers stay text here on purpose: validate_data_files parses the Q and reward columns and
    reports what does not parse, where pandas would turn "n/a" into NaN without a word. Every row
    must have as many fields as the header: pandas would pad a short row with empty fields without
    a word.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
    try:
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")  # line endings left as they are
    except UnicodeDecodeError as error:
        offset = error.start + (len(raw) - len(error.object))  # count the BOM, if any
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {offset} of the file: "
                        f"{error.reason}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; regenerate it (see data/README.md)")
    header = next(csv.reader(io.StringIO(text, newline="")))
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}:1: column(s) {', '.join(duplicated)} appear more than once in "
                        "the header; keep one of each")
    counts = np.array(count_fields(text, path)[1:])
    bad = np.flatnonzero(counts != len(header))
    if len(bad):
        raise DataError("\n".join(list_row_problems(
            path, bad, lambda row: f"{counts[row]} field(s) but the header has {len(header)}; "
                                   "fix the row (a blank line, a lost comma or a stray quote)")))
    # pyarrow's reader cannot take line breaks inside quoted fields (Harmony prompts have them)
    engine = CSV_ENGINE if len(LINE_ENDING.findall(text.rstrip("\r\n"))) == len(counts) else "c"
    if engine == "pyarrow":
        options = {"na_values": []}
    else:
        options = {"na_filter": False, "skip_blank_lines": False, "index_col": False}
    try:
        df = pd.read_csv(path, engine=engine, dtype=str, keep_default_na=False,
                         encoding="utf-8-sig", **options)
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(f"{path}: not a readable CSV ({str(error).strip()})") from None
    if len(df) != len(counts):
        raise DataError(f"{path}: found {len(counts)} records but pandas read {len(df)} rows; "
                        "look for a stray quote character in an unquoted field")
    if PROMPT_COLUMN not in df.columns:
        raise DataError(f"{path}:1: no {PROMPT_COLUMN!r} column; the header has "
                        f"{', '.join(map(str, df.columns))}")
    return df


def list_row_problems(path, rows, what):
    """Return `path:row: what` lines for the given 0-based data rows, at most MAX_ROWS_LISTED."""
    rows = list(rows)
    lines = [f"{path}:{row + FIRST_DATA_ROW}: {what(row)}" for row in rows[:MAX_ROWS_LISTED]]
    if len(rows) > MAX_ROWS_LISTED:
        lines.append(f"{path}: ... and {len(rows) - MAX_ROWS_LISTED} more rows like the above")
    return lines


def parse_number_column(df, column, path):
    """Return (column as float64, problem lines) with an explicit check of every cell."""
    text = df[column].astype(str)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    problems = list_row_problems(
        path, bad, lambda row: f"{column} is {text.iat[row]!r}, not a finite number")
    return values, problems


def list_prompt_problems(prompts, path):
    """`path:row:` lines for prompts that are unsafe text (a legacy situation) or not exactly a rendered Harmony
    prompt with a safe user message (harmony.why_unsafe_text, why_not_rendered_prompt)."""
    reasons = [why_not_rendered_prompt(p) if is_harmony_prompt(p) else why_unsafe_text(p) for p in prompts]
    bad = [row for row, reason in enumerate(reasons) if reason]
    return list_row_problems(path, bad, lambda row: f"{PROMPT_COLUMN} {reasons[row]}")


def list_file_problems(df, path, require_rewards):
    """Return (problem lines, {column: float values}) for one data frame read from path."""
    problems = []
    numbers = {}
    if len(df) == 0:
        return [f"{path}: the header has no data rows below it"], numbers
    empty_prompt = np.flatnonzero((df[PROMPT_COLUMN].astype(str).str.strip() == "").to_numpy())
    problems += list_row_problems(path, empty_prompt, lambda row: f"{PROMPT_COLUMN} is empty")
    problems += list_prompt_problems(df[PROMPT_COLUMN].astype(str), path)
    try:
        q_columns = find_action_columns(df.columns, Q_PREFIX)
    except DataError as error:
        return problems + [f"{path}:1: {line}" for line in str(error).splitlines()], numbers
    for column in q_columns:
        numbers[column], column_problems = parse_number_column(df, column, path)
        problems += column_problems
    reward_names = [str(name) for name in df.columns if str(name).startswith(REWARD_PREFIX)]
    if not require_rewards:
        return problems, numbers
    if not reward_names:
        return problems + [f"{path}:1: no {REWARD_PREFIX}<i> columns; compute them with "
                           f"python calculate_reward.py {path} --tau 0.05"], numbers
    try:
        reward_columns = find_action_columns(df.columns, REWARD_PREFIX)
    except DataError as error:
        return problems + [f"{path}:1: {line}" for line in str(error).splitlines()], numbers
    if len(reward_columns) != len(q_columns):
        return problems + [f"{path}:1: {len(reward_columns)} {REWARD_PREFIX}<i> columns but "
                           f"{len(q_columns)} {Q_PREFIX}<i> columns; recompute them with "
                           f"python calculate_reward.py {path} --tau 0.05 --overwrite"], numbers
    for column in reward_columns:
        numbers[column], column_problems = parse_number_column(df, column, path)
        problems += column_problems
    rewards = np.column_stack([numbers[column] for column in reward_columns])
    finite = np.isfinite(rewards).all(axis=1)
    out_of_range = np.flatnonzero(finite & ((rewards < 0) | (rewards > 1)).any(axis=1))
    problems += list_row_problems(path, out_of_range,
                                  lambda row: f"a {REWARD_PREFIX}<i> value lies outside [0, 1]")
    sums = rewards.sum(axis=1)
    bad_sum = np.flatnonzero(finite & (np.abs(sums - 1) > REWARD_SUM_TOLERANCE))
    problems += list_row_problems(
        path, bad_sum, lambda row: f"{REWARD_PREFIX}<i> sum to {sums[row]:.9g}, not 1; recompute "
                                   f"with python calculate_reward.py {path} --tau 0.05 --overwrite")
    return problems, numbers


def validate_data_files(paths, require_rewards=True, same_action_count=True):
    """Read and check every data CSV; return {Path: DataFrame} or raise one DataError.

    Checks: the file reads as UTF-8 CSV with a `prompt` column and no empty prompt; q_action_0..n-1
    exist and are finite numbers; with require_rewards, reward_action_0..n-1 exist, are finite,
    lie in [0, 1] and sum to 1 per row; with same_action_count, every file has the same n.
    The DataError lists every problem across all files (MAX_ROWS_LISTED rows per file and problem).
    In the frames returned, the Q and reward columns are float64 and every other column is text.
    """
    problems = []
    frames = {}
    action_counts = {}
    for path in map(Path, paths):
        try:
            df = read_data_csv(path)
        except DataError as error:
            problems += str(error).splitlines()
            continue
        file_problems, numbers = list_file_problems(df, path, require_rewards)
        problems += file_problems
        for column, values in numbers.items():
            df[column] = values
        action_counts[path] = sum(1 for column in numbers if column.startswith(Q_PREFIX))
        frames[path] = df
    counted = {path: count for path, count in action_counts.items() if count}
    if same_action_count and len(set(counted.values())) > 1:
        first_path, first_count = next(iter(counted.items()))
        for path, count in counted.items():
            if count != first_count:
                problems.append(f"{path}:1: {count} actions ({Q_PREFIX}<i> columns) but "
                                f"{first_path} has {first_count}; every file of a run needs the "
                                "same actions")
    if problems:
        raise DataError("\n".join(problems))
    return frames
