"""Time calculate_reward.py on a large synthetic CSV (a measurement, not a test).

    python benchmarks/bench_calculate_reward.py
    python benchmarks/bench_calculate_reward.py --rows 1000000 --actions 4 --prompt-chars 345

Writes a CSV of --rows rows (row_id, prompt, q_action_0..n-1) into a temporary directory, runs
calculate_reward.main on it once without and once with --overwrite, prints the wall times and
removes the directory. Reads and writes nothing else.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# calculate_reward.py and data_reward.py sit one directory up
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import calculate_reward  # noqa: E402

# ------------------------------------------------------------------------------------------------
ROWS = 1_000_000  # rows in the synthetic CSV
ACTIONS = 4  # q_action_ columns
PROMPT_CHARS = 40  # prompt length; the TES data set's prompts are about 345 characters
TAU = 0.05  # Boltzmann temperature passed to calculate_reward.py
SEED = 0  # Q values are drawn from a seeded generator
# ------------------------------------------------------------------------------------------------


def make_table(rows, actions, prompt_chars, seed):
    """Return a data frame shaped like a data CSV, with comma-holding prompts that need quoting."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"row_id": np.arange(rows),
                          "prompt": ("Tank half full, load large, " * prompt_chars)[:prompt_chars]})
    for action in range(actions):
        table[f"q_action_{action}"] = np.round(rng.normal(-40.0, 0.1, rows), 6)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--actions", type=int, default=ACTIONS)
    parser.add_argument("--prompt-chars", type=int, default=PROMPT_CHARS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.csv"
        make_table(args.rows, args.actions, args.prompt_chars, SEED).to_csv(path, index=False)
        size_mb = path.stat().st_size / 1e6
        for extra in ([], ["--overwrite"]):
            start, start_cpu = time.perf_counter(), time.process_time()
            status = calculate_reward.main([str(path), "--tau", str(TAU), *extra])
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            # CPU time too: on a shared machine the wall time also counts other people's work
            print(f"{args.rows} rows x {args.actions} actions, {size_mb:.0f} MB "
                  f"{' '.join(extra) or '(new columns)'}: {seconds:.2f} s wall, {cpu:.2f} s CPU, "
                  f"exit {status}")


if __name__ == "__main__":
    main()
