"""The data contract of the TES control task: columns, validation, Boltzmann rewards.

This module holds what every stage agrees on about a data CSV, and (further down, added by the
training side) the TRL reward functions that score a completion against a row.

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
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from harmony import is_harmony_prompt, parse_final_action, why_not_rendered_prompt, why_unsafe_text

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


def write_text_atomically(text, path):
    """Write text (UTF-8, line endings untouched) to path via a temp file and os.replace.

    A reader never sees a half-written file: the temp file sits in the same directory (so the
    rename is atomic on one filesystem) and is removed on any exception, Ctrl-C included.
    """
    path = Path(path)
    # a plain exclusive open (not mkstemp, which makes the file 0600) gives a new file the usual
    # mode; an existing file keeps its own
    temp_name = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp_name, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temp_name, path.stat().st_mode & 0o777)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def why_not_writable(path, directory=False):
    """None when `path` (a file, or with directory=True a directory) can be written; else the reason, one line.

    Checks what a write would hit: a directory where a file is wanted or the reverse, a file among the parents,
    and whether a file can be created in the nearest existing directory (tried, because permissions alone do not
    tell: root ignores them, a read-only mount does not).
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory; choose another place"
    if not directory and path.is_dir():
        return f"{path} is a directory; name a file"
    existing = path if directory else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {existing} is a file, so nothing can be created under it; choose another place"
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        return f"{existing}: cannot be written ({error.strerror}); check its permissions or choose another place"
    return None


def write_csv_atomically(df, path):
    """Write df as CSV (no index, "\\n" line endings) to path via a temp file and os.replace."""
    write_text_atomically(df.to_csv(index=False, lineterminator="\n"), path)


def strict_json(data):
    """JSON text (indented, newline at the end) that every parser reads: NaN and infinities become null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False) + "\n"


# -----------------------------------------------------------------------------
# Reward functions in TRL's contract: f(prompts, completions, completion_ids, **dataset columns) -> list[float | None]


def decode_completions(tokenizer, completion_ids):
    """TRL decodes completions with skip_special_tokens=True, which erases the Harmony channel markers;
    the rewards decode the token ids themselves, markers kept."""
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=False)


REWARD_NAMES = ("action_reward", "format_reward")  # make_reward_functions' rewards, in its order; each weighs 1


def reward_metric(name="action_reward"):
    """The mean TRL logs for the reward function `name` (its __name__)."""
    return f"rewards/{name}/mean"


def reward_weights():
    """GRPOConfig.reward_weights: the rewards are summed, one weight per function of make_reward_functions."""
    return [1.0] * len(REWARD_NAMES)


def make_reward_functions(tokenizer, format_penalty=1.0, completion_log=None):
    """The two rewards GRPO trains on: the Boltzmann action reward and the format reward.

    - `action_reward`: reward_action_<a> of the action in the final message; None for an invalid answer (the data
      has no reward for 'no action'). In TRL 1.x a completion for which *every* reward returns None is
      'unscorable' and gets advantage 0, so on its own this would let the format drift unpunished.
    - `format_reward`: 0 for a valid answer, -format_penalty for an invalid one. Summed with the action reward
      (TRL's default aggregation) an invalid answer scores -format_penalty and sits below every valid one in its
      group, which keeps the valid-answer rate up.
    Both parse each completion once (cached per batch) with harmony.parse_final_action.
    """
    # The batch last parsed, held by reference: TRL hands both rewards the same list object. Keyed by the object, not
    # by id(): a freed list's id is reused by the next batch's list, which would then get the old batch's parses.
    cache = {"batch": None, "parsed": None}

    def parse(completion_ids, num_actions):
        if cache["batch"] is not completion_ids:
            texts = decode_completions(tokenizer, completion_ids)
            cache["parsed"] = (texts, [parse_final_action(t, num_actions) for t in texts])
            cache["batch"] = completion_ids
        return cache["parsed"]

    def action_reward(prompts, completions, completion_ids, action_rewards, **kwargs):
        texts, actions = parse(completion_ids, len(action_rewards[0]))
        rewards = [None if a is None else float(r[a]) for a, r in zip(actions, action_rewards)]
        log_metric, optimal = kwargs.get("log_metric"), kwargs.get("optimal_action")
        if log_metric is not None:
            log_metric("valid_rate", sum(a is not None for a in actions) / len(actions))
            if optimal is not None:
                log_metric("accuracy", sum(a == o for a, o in zip(actions, optimal)) / len(actions))
        if completion_log is not None:
            completion_log.write_batch(kwargs.get("trainer_state"), kwargs.get("prompt_id"), texts, actions,
                                       rewards, kwargs.get("optimal_action"))
        return rewards

    def format_reward(prompts, completions, completion_ids, action_rewards, **kwargs):
        _, actions = parse(completion_ids, len(action_rewards[0]))
        return [0.0 if a is not None else -float(format_penalty) for a in actions]

    functions = [action_reward, format_reward]
    assert tuple(f.__name__ for f in functions) == REWARD_NAMES  # the names TRL logs them under
    return functions


COMPLETION_LOG_COLUMNS = ["step", "micro_step", "rank", "prompt_id", "completion", "parsed_action", "reward",
                          "optimal_action"]
# the columns of a log written before several processes could train (no rank): still read, and continued by --resume
RANKLESS_LOG_COLUMNS = [name for name in COMPLETION_LOG_COLUMNS if name != "rank"]


class CompletionLog:
    """Appends every scored completion to a CSV that survives a crash: header once, each batch flushed to disk.

    `step` is the optimiser step the completion trains, counted from 1 like TensorBoard and the checkpoints
    (trainer_state.global_step + 1 while it is generated), and `micro_step` the first micro-batch it feeds, also
    from 1: global_step * steps_per_generation + 1, where steps_per_generation (GRPO_STEPS_PER_GENERATION) is the
    number of micro-batches one generation serves (= gradient accumulation steps by default).
    `rank` is the process that generated and scored the completion (0 with one process). Under `accelerate launch`
    every process scores its own completions; their rows are gathered to the main process, which alone writes the
    file: one writer, so no record is ever interleaved with another process's and a kill can cut off at most the
    last record, as with one process. A log written before the rank column existed is read with an empty rank.
    A batch is several writes: a kill can leave its last record cut off, which `keep_steps_up_to` removes.
    """

    def __init__(self, path, steps_per_generation=1):
        self.path, self.steps_per_generation = str(path), int(steps_per_generation)

    def write_batch(self, trainer_state, prompt_ids, completions, actions, rewards, optimal):
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState()
        done = trainer_state.global_step if trainer_state is not None else 0
        rows = [[done + 1, done * self.steps_per_generation + 1, state.process_index,
                 prompt_ids[i] if prompt_ids else "", text, "" if actions[i] is None else actions[i],
                 "" if rewards[i] is None else f"{rewards[i]:.6f}", optimal[i] if optimal else ""]
                for i, text in enumerate(completions)]
        if state.num_processes > 1:
            rows = gather_object(rows)  # every process calls this for each batch; rows come back in process order
        if not state.is_main_process:
            return
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(COMPLETION_LOG_COLUMNS)
            for row in rows:
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self):
        """(rows as lists of text, whether a last record cut off by a kill was left out); header not included.

        A log written before steps counted from 1 (its first step is 0) is renumbered, and one written before the
        rank column gets an empty rank. Raises DataError for a record in the middle of the file that does not have
        the log's columns (damage a kill cannot cause).
        """
        with open(self.path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")  # a kill can cut a character in two, at the end
        end = complete_records_end(text)
        records = list(csv.reader(io.StringIO(text[:end], newline="")))
        torn = end < len(text)
        if not records:
            return [], torn  # at most a part of the header
        if records[0] not in (COMPLETION_LOG_COLUMNS, RANKLESS_LOG_COLUMNS):
            raise DataError(f"{self.path}:1: not a completion log (its header is {','.join(records[0])}); move "
                            "it aside, or set GRPO_COMPLETION_LOG_PATH to another file")
        header, rows = records[0], records[1:]
        for number, row in enumerate(rows, start=FIRST_DATA_ROW):
            if len(row) != len(header):
                raise DataError(f"{self.path}:{number}: {len(row)} fields, a completion log row has "
                                f"{len(header)}; the log is damaged, move it aside to continue")
        if header == RANKLESS_LOG_COLUMNS:
            rows = [row[:2] + [""] + row[2:] for row in rows]
        if rows and min(int(row[0]) for row in rows) == 0:
            for row in rows:
                row[0], row[1] = str(int(row[0]) + 1), str(int(row[1]) + 1)
        return rows, torn

    def keep_steps_up_to(self, step):
        """Forget rows of steps after `step` (a resumed run generates them again) and a record cut off by a kill.

        Rewrites the log atomically (with the rank column, also a log written before it); returns (rows dropped,
        whether a cut-off record was dropped).
        """
        if not os.path.exists(self.path):
            return 0, False
        rows, torn = self.read_rows()
        keep = [row for row in rows if int(row[0]) <= step]
        buffer = io.StringIO(newline="")
        csv.writer(buffer).writerows([COMPLETION_LOG_COLUMNS, *keep])
        write_text_atomically(buffer.getvalue(), self.path)
        return len(rows) - len(keep), torn


def complete_records_end(text):
    """Length of the part of CSV text up to the end of its last complete record: a line break outside quotes."""
    end, inside = 0, False
    for match in re.finditer(r'["\n]', text):
        if match[0] == '"':
            inside = not inside
        elif not inside:
            end = match.end()
    return end
