"""benchmarks/seed_sweep.py: the per-seed row read from a run's summary, the bar check, and the RESULTS.md section."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("seed_sweep", ROOT / "benchmarks" / "seed_sweep.py")
seed_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_sweep)


def summary(gain=0.1, trained=0.36, valid=0.98, last_valid=0.97, kept_step=700):
    """The fields of a train_grpo.py summary.json that the sweep reads."""
    return {"steps_done": 800, "train_seconds": 330.0, "training": {"last_steps": {"valid_rate": last_valid}},
            "kept": {"step": kept_step, "reason": "step 700 scored best"},
            "held_out": {"prompts": 576, "samples": 4, "untrained": {"mean_reward": trained - gain},
                         "trained": {"mean_reward": trained, "valid_rate": valid},
                         "gain": {"mean": gain, "ci95": [gain - 0.02, gain + 0.02]},
                         "references": {"uniform": {"mean_reward": 0.25}, "best_constant": {"mean_reward": 0.3125},
                                        "optimal": {"mean_reward": 0.5875}}}}


def write_run(tmp_path, seed, **fields):
    run = tmp_path / f"seed-{seed}"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary(**fields)))
    return run


def test_a_row_holds_gain_interval_rewards_valid_rates_and_the_kept_step(tmp_path):
    row = seed_sweep.read_row(3, write_run(tmp_path, 3), 400.0, 0)
    assert row["seed"] == 3 and row["gain"] == pytest.approx(0.1) and row["gain_ci95"] == pytest.approx([0.08, 0.12])
    assert row["trained_reward"] == 0.36 and row["held_out_valid_rate"] == 0.98
    assert row["last_steps_valid_rate"] == 0.97 and row["kept_step"] == 700 and row["wall_seconds"] == 400.0


def test_a_failed_run_is_a_row_with_its_last_log_line(tmp_path):
    run = tmp_path / "seed-4"
    Path(f"{run}.log").write_text("step 1/800\nerror: out of disk\n")
    row = seed_sweep.read_row(4, run, 12.0, 1)
    assert row["failed"] == "error: out of disk"
    assert seed_sweep.check_bar([row]) == ["seed 4: the run failed (error: out of disk)"]


def test_the_bar_names_every_seed_and_measure_that_misses_it(tmp_path):
    rows = [seed_sweep.read_row(1, write_run(tmp_path, 1, gain=0.07), 1.0, 0),
            seed_sweep.read_row(2, write_run(tmp_path, 2, last_valid=0.66), 1.0, 0),
            seed_sweep.read_row(3, write_run(tmp_path, 3), 1.0, 0)]
    misses = seed_sweep.check_bar(rows)
    assert any(m.startswith("seed 1: gain 0.070") for m in misses)
    assert any(m.startswith("seed 2: last steps valid rate 0.660") for m in misses)
    assert not any(m.startswith("seed 3") for m in misses)
    assert seed_sweep.check_bar([rows[2]]) == []
    low = seed_sweep.read_row(5, write_run(tmp_path, 5, trained=0.33), 1.0, 0)
    assert seed_sweep.check_bar([rows[2], low, low]) == ["median trained reward 0.330 < 0.36"]


def test_the_table_replaces_its_own_section_and_keeps_the_others():
    text = "# Figures\n\n## A\n\nold a\n\n## Seeds\n\nold table\n\n## C\n\nkeep c\n"
    new = seed_sweep.replace_section(text, "## Seeds", "new table\n")
    assert "old table" not in new and "new table" in new and "old a" in new and new.endswith("## C\n\nkeep c\n")
    appended = seed_sweep.replace_section("# Figures\n", "## Seeds", "t\n")
    assert appended == "# Figures\n\n## Seeds\n\nt\n"


def test_a_sweep_never_writes_over_earlier_runs(tmp_path):
    (tmp_path / "seed-2").mkdir()
    with pytest.raises(SystemExit, match="seeds 2; pass another --out"):
        seed_sweep.main(["--out", str(tmp_path), "--seeds", "1", "2"])


def test_the_table_quotes_the_reference_policies_of_the_runs_own_summary(tmp_path):
    rows = [seed_sweep.read_row(1, write_run(tmp_path, 1), 300.0, 0)]
    table = seed_sweep.render_table(rows, [], 1, 2, [])
    assert "uniform guessing 0.250, best constant 0.312, optimal 0.588" in table  # read, not written in
