"""Run the main job (`python train_grpo.py --tiny`) for several seeds and tabulate how it learned on each.

    python benchmarks/seed_sweep.py --results                    # seeds 1-5, one after another; table into RESULTS.md
    python benchmarks/seed_sweep.py --seeds 1 2 3 --jobs 3 --out runs/sweep-lr3e-3 --train-flags --learning-rate 3e-3

Each seed is one `train_grpo.py --tiny --seed S --out OUT/seed-S` process (its log beside it: OUT/seed-S.log),
timed from start to exit (stand-in build excluded: the sweep builds it first). After every finished seed the table
is written again, so a sweep cut short keeps what it measured:
OUT/seed_sweep.md and .json (per seed: held-out gain with its paired 95% interval, trained held-out reward, valid
rate held out and in the last training steps, the step whose adapter was kept, wall time), and with --results the
same table replaces the section SECTION of benchmarks/RESULTS.md. BAR is checked for every seed; the process exits
1 if a seed misses it or a run fails.

Runs are reproducible on one machine with the same thread count, so the same seed gives the same row; JOBS > 1
runs seeds side by side (each with THREADS OpenMP threads): only on a machine with JOBS * THREADS idle cores
is its wall time the one a user sees.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# -----------------------------------------------------------------------------
SEEDS = [1, 2, 3, 4, 5]  # one main-job run per seed
OUT = "runs/seed-sweep"  # the runs go to OUT/seed-S, the table to OUT/seed_sweep.md/.json
JOBS = 1  # seeds run side by side
THREADS = 2  # OpenMP threads per run (the main job's machine: 2 cores)
RESULTS = ROOT / "benchmarks" / "RESULTS.md"  # --results puts the table here, under SECTION
SECTION = "## Learning across seeds: the main job on 2 CPU cores"
BAR = {"gain": 0.08, "valid_rate": 0.95, "median_trained_reward": 0.36}  # every seed: held-out gain and valid
                                                                        #   rates (held out, last steps); the median
# -----------------------------------------------------------------------------


def command_for(seed, out, train_flags):
    return [sys.executable, str(ROOT / "train_grpo.py"), "--tiny", "--seed", str(seed), "--out", str(out),
            *train_flags]


def read_row(seed, out, wall, returncode):
    """One table row from a finished run's summary.json (or the reason it has none)."""
    row = {"seed": seed, "wall_seconds": wall}
    summary_path = out / "summary.json"
    if returncode != 0 or not summary_path.is_file():
        log = Path(f"{out}.log").read_text(errors="replace").strip().splitlines() if Path(f"{out}.log").is_file() else []
        row["failed"] = (log[-1] if log else "(no output)")[:200]
        return row
    summary = json.loads(summary_path.read_text())
    held_out, kept = summary.get("held_out") or {}, summary.get("kept") or {}
    row.update({"steps": summary["steps_done"], "train_seconds": summary["train_seconds"],
                "last_steps_valid_rate": summary["training"]["last_steps"]["valid_rate"],
                "kept_step": kept.get("step"), "kept_reason": kept.get("reason")})
    if held_out:
        row.update({"prompts": held_out["prompts"], "samples": held_out["samples"],
                    "untrained_reward": held_out["untrained"]["mean_reward"],
                    "trained_reward": held_out["trained"]["mean_reward"],
                    "gain": held_out["gain"]["mean"], "gain_ci95": held_out["gain"]["ci95"],
                    "held_out_valid_rate": held_out["trained"]["valid_rate"]})
        references = held_out.get("references") or {}
        if references:  # what guessing, the best constant action and the optimal policy earn on the same prompts
            row["references"] = {name: references[name]["mean_reward"] for name in ("uniform", "best_constant",
                                                                                    "optimal")}
    return row


def check_bar(rows):
    """BAR on every seed, and the median trained reward over the seeds: a list of what missed it."""
    misses = []
    for row in rows:
        if "failed" in row:
            misses.append(f"seed {row['seed']}: the run failed ({row['failed']})")
            continue
        if "gain" not in row:
            misses.append(f"seed {row['seed']}: no held-out evaluation (EVAL_SAMPLES 0?)")
            continue
        for key, least in (("gain", BAR["gain"]), ("held_out_valid_rate", BAR["valid_rate"]),
                           ("last_steps_valid_rate", BAR["valid_rate"])):
            if row[key] is None or row[key] < least:
                misses.append(f"seed {row['seed']}: {key.replace('_', ' ')} {row[key]:.3f} < {least}")
    rewards = [row["trained_reward"] for row in rows if "trained_reward" in row]
    if len(rewards) == len(rows) and rows and statistics.median(rewards) < BAR["median_trained_reward"]:
        misses.append(f"median trained reward {statistics.median(rewards):.3f} < {BAR['median_trained_reward']}")
    return misses


def render_table(rows, train_flags, jobs, threads, misses):
    def fmt(x, digits=3, sign=False):
        return "n/a" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"

    command = "python train_grpo.py --tiny --seed S" + ("".join(f" {f}" for f in train_flags))
    shape = next((f"{row['prompts']} prompts x {row['samples']} answers" for row in rows if "prompts" in row), "n/a")
    references = next((row["references"] for row in rows if "references" in row), None)
    against = ("" if references is None else f" (on these prompts: uniform guessing {references['uniform']:.3f}, "
               f"best constant {references['best_constant']:.3f}, optimal {references['optimal']:.3f})")
    lines = [f"`{command}`: {threads} CPU threads per run, {jobs} run(s) at a time. Held out: {shape} at "
             f"temperature 1{against}.",
             "", "| seed | held-out gain [95% CI] | trained reward | valid held out | valid last steps | kept step | "
             "wall time |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['seed']} | failed: {row['failed']} | | | | | {row['wall_seconds']:.0f} s |")
            continue
        low, high = row.get("gain_ci95") or (None, None)
        kept = "n/a" if row["kept_step"] is None else f"{row['kept_step']} of {row['steps']}"
        lines.append(f"| {row['seed']} | {fmt(row.get('gain'), sign=True)} [{fmt(low, sign=True)}, "
                     f"{fmt(high, sign=True)}] | {fmt(row.get('trained_reward'))} | "
                     f"{fmt(row.get('held_out_valid_rate'))} | {fmt(row['last_steps_valid_rate'])} | {kept} | "
                     f"{row['wall_seconds'] / 60:.1f} min |")
    rewards = [row["trained_reward"] for row in rows if "trained_reward" in row]
    if rewards:
        lines += ["", f"Median trained reward {statistics.median(rewards):.3f}; "
                  f"{'every seed meets the bar' if not misses else 'missed: ' + '; '.join(misses)}."]
    return "\n".join(lines) + "\n"


def replace_section(text, section, body):
    """`text` with the body of the Markdown section headed `section` replaced (appended if it is not there)."""
    start = text.find(section + "\n")
    if start < 0:
        return text.rstrip("\n") + f"\n\n{section}\n\n{body}"
    end = text.find("\n## ", start + len(section))
    return text[:start] + f"{section}\n\n{body}" + (text[end:] if end >= 0 else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--results", action="store_true", help=f"also write the table into {RESULTS.name}")
    parser.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the command line goes to train_grpo.py")
    args = parser.parse_args(argv)
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    existing = [seed for seed in args.seeds if (out / f"seed-{seed}").exists()]
    if existing:
        raise SystemExit(f"error: {out} already holds runs of seeds {', '.join(map(str, existing))}; pass another "
                         "--out or delete them")
    out.mkdir(parents=True, exist_ok=True)

    import tiny_gpt_oss

    tiny_gpt_oss.ensure_tiny_model()  # built once here, not timed inside the first seed's run
    from output_files import strict_json, write_text_atomically

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    pending, running, rows = list(args.seeds), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            run_dir = out / f"seed-{seed}"
            with open(f"{run_dir}.log", "w") as log_file:
                process = subprocess.Popen(command_for(seed, run_dir, args.train_flags), cwd=ROOT, env=env,
                                           stdout=log_file, stderr=subprocess.STDOUT)
            running[seed] = (process, time.time(), run_dir)
            print(f"seed {seed}: started ({run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir})",
                  flush=True)
        time.sleep(1)
        for seed, (process, start, run_dir) in list(running.items()):
            if process.poll() is None:
                continue
            del running[seed]
            row = read_row(seed, run_dir, time.time() - start, process.returncode)
            rows.append(row)
            rows.sort(key=lambda r: r["seed"])
            print(f"seed {seed}: " + (f"FAILED: {row['failed']}" if "failed" in row else
                                      f"gain {row.get('gain', float('nan')):+.3f}, trained reward "
                                      f"{row.get('trained_reward', float('nan')):.3f}, "
                                      f"{row['wall_seconds'] / 60:.1f} min"), flush=True)
            misses = check_bar(rows)
            table = render_table(rows, args.train_flags, args.jobs, args.threads, misses)
            write_text_atomically(table, out / "seed_sweep.md")
            write_text_atomically(strict_json({"train_flags": args.train_flags, "jobs": args.jobs,
                                               "threads": args.threads, "rows": rows, "misses": misses}),
                                  out / "seed_sweep.json")
    print(table)
    if args.results:
        write_text_atomically(replace_section(RESULTS.read_text(), SECTION, table), RESULTS)
        print(f"table written into {RESULTS.relative_to(ROOT)}")
    if misses:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
