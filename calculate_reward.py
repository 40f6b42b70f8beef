"""Add Boltzmann reward columns to data CSVs: reward_action_i = softmax(Q / tau) per row.

    python calculate_reward.py data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv --tau 0.05
    python calculate_reward.py data/ --tau 0.05 --overwrite

PATH is one CSV file or a directory, whose *.csv files (not those in subdirectories) are all done.
Every q_action_<i> column counts (any number of actions); reward_action_<i> columns are appended
after the last column, one per action, formatted with REWARD_FORMAT.

- A file that already has reward_action_* columns is left untouched unless --overwrite is given;
  then its old reward columns are dropped and the new ones appended at the end.
- Every other byte of the file stays as it was: each record's own text is kept and only the new
  fields are added to it (line endings, quoting, a missing final newline, a UTF-8 BOM all survive).
  The one exception: with --overwrite, when the old reward columns were not the last ones or were
  quoted, a record is rebuilt from its fields with minimal quoting (same values, maybe other quotes).
- Every file is validated before any is written (data_reward.validate_data_files); on any problem
  the command prints one `error: file:row: what is wrong` line per problem on stderr, modifies
  nothing and exits with 2. Each file is replaced atomically (temp file + rename), so Ctrl-C never
  leaves a half-written CSV. Rows count as in a spreadsheet: the header is row 1.
"""
import argparse
import csv
import io
import sys
from pathlib import Path

import data_reward
import output_files
from data_reward import REWARD_PREFIX, DataError

# ------------------------------------------------------------------------------------------------
DEFAULT_TAU = 0.05  # Boltzmann temperature, in the units of the Q columns
REWARD_FORMAT = ".10g"  # 10 significant digits: each value within 5e-11 relative, so a row of
#                         rewards sums to 1 within 1e-9 for any practical number of actions
EXIT_BAD_INPUT = 2  # exit status for bad arguments or data (argparse uses 2 as well)
# ------------------------------------------------------------------------------------------------


def find_csv_paths(path):
    """Return [path] for a file, or the sorted *.csv files directly inside a directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        paths = sorted(p for p in path.glob("*.csv") if p.is_file())
        if not paths:
            raise DataError(f"{path}: directory has no *.csv files (subdirectories are not "
                            "searched); pass a CSV file or a directory holding them")
        return paths
    return [path]


def join_fields(fields):
    """Return fields as one CSV record body, quoted only where needed."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(fields)
    return buffer.getvalue()


def format_rewards(rewards):
    """Return one text per row: the row's rewards in REWARD_FORMAT, joined by commas."""
    template = ",".join(["%" + REWARD_FORMAT] * rewards.shape[1])
    return [template % tuple(row) for row in rewards.tolist()]


def add_reward_fields(text, path, reward_texts, n_actions):
    """Return text with its reward_action_* fields dropped and the new ones appended to each record.

    reward_texts holds one comma-joined text per data row, in file order; the rows' field counts
    were checked by data_reward.read_data_csv. Raises DataError when the records do not line up.
    """
    bodies, endings = data_reward.split_records(text, path)
    if len(bodies) - 1 != len(reward_texts):
        raise DataError(f"{path}: found {len(bodies) - 1} records but read {len(reward_texts)} "
                        "rows; look for a stray quote character in an unquoted field")
    header = next(csv.reader([bodies[0].removeprefix("\ufeff")]))
    old = [i for i, name in enumerate(header) if name.startswith(REWARD_PREFIX)]
    if old:
        bodies = drop_fields(bodies, old, len(header))
    new_texts = [",".join(f"{REWARD_PREFIX}{i}" for i in range(n_actions)), *reward_texts]
    return "".join([f"{body},{new}{ending}"
                    for body, new, ending in zip(bodies, new_texts, endings)])


def drop_fields(bodies, positions, n_fields):
    """Return the record bodies without the fields at positions (0-based)."""
    if positions == list(range(n_fields - len(positions), n_fields)):
        kept = [body.rsplit(",", len(positions))[0] for body in bodies]
        # unquoted trailing fields hold no comma, so the text before them is the record's own
        if not any('"' in body[len(head):] for body, head in zip(bodies, kept)):
            return kept
    dropped = set(positions)
    return [join_fields([field for i, field in enumerate(next(csv.reader([body])))
                         if i not in dropped]) for body in bodies]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a data CSV or a directory of them")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU,
                        help="Boltzmann temperature, > 0 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute reward columns that are already there")
    args = parser.parse_args(argv)
    try:
        data_reward.check_tau(args.tau)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    skipped = []
    outputs = {}
    try:
        paths = find_csv_paths(args.path)
        # the files of one directory may differ in actions: each gets its own reward columns
        frames = data_reward.validate_data_files(paths, require_rewards=False,
                                                 same_action_count=False)
        for path, df in frames.items():
            if any(str(name).startswith(REWARD_PREFIX) for name in df.columns) and not args.overwrite:
                skipped.append(path)
                continue
            q = data_reward.q_matrix(df)
            rewards = data_reward.boltzmann_rewards(q, args.tau)
            with open(path, encoding="utf-8", newline="") as handle:
                text = handle.read()
            outputs[path] = (add_reward_fields(text, path, format_rewards(rewards), q.shape[1]),
                             q.shape)
        unwritable = [reason for reason in map(output_files.why_not_writable, outputs) if reason]
        if unwritable:  # before any file is written
            raise DataError("\n".join(unwritable))
    except DataError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in skipped:
        print(f"{path}: already has {REWARD_PREFIX}* columns; left untouched "
              "(add --overwrite to recompute them)")
    for path, (text, (rows, actions)) in outputs.items():
        try:
            output_files.write_text_atomically(text, path)
        except OSError as error:  # checked above, so only a full disk or a directory that just changed
            print(f"error: {path}: cannot be written ({error.strerror}); it is left as it was", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{path}: wrote {REWARD_PREFIX}0..{actions - 1} for {rows} rows at tau={args.tau:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
