"""The main job must learn: `python train_grpo.py --tiny`, as a new user runs it, with its fixed seeds.

On held-out prompts (EVAL_SAMPLES answers each at temperature 1) the trained stand-in's mean Boltzmann reward must
beat the untrained one's by at least 0.08 while its valid-answer rate stays at or above 95 %, and the valid rate
must hold during training: the per-seed bar of `benchmarks/seed_sweep.py` (RESULTS.md: gains of +0.104 to +0.136
over seeds 1-5, where seed 3's last-steps valid rate, 0.912, misses it; this seed, as here: +0.108, valid 0.963 in
the last steps). A run is reproducible on one machine, so the figures do not change from run to run.

The whole main job takes ~9 minutes on 2 cores, so it runs when asked for (conftest.py), as CI does:

    python -m pytest tests -m learning
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.learning
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("main-job") / "grpo-tiny"
    start = time.time()
    result = subprocess.run([sys.executable, "train_grpo.py", "--tiny", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-2500:])
    data = json.loads((out / "summary.json").read_text())
    data["wall_seconds"] = time.time() - start
    return data


def test_trained_policy_beats_the_untrained_one_by_at_least_0_08_on_held_out_prompts(summary):
    held_out = summary["held_out"]
    assert held_out["prompts"] >= 500 and held_out["samples"] >= 4
    gain = held_out["trained"]["mean_reward"] - held_out["untrained"]["mean_reward"]
    assert gain >= 0.08, held_out


def test_valid_answer_rate_stays_at_or_above_95_percent(summary):
    assert summary["held_out"]["trained"]["valid_rate"] >= 0.95
    assert summary["training"]["last_steps"]["valid_rate"] >= 0.95  # it held during training too


def test_summary_reports_the_reference_policies_beside_the_gain(summary):
    references = summary["held_out"]["references"]
    assert references["uniform"]["mean_reward"] == pytest.approx(0.25, abs=1e-6)
    assert references["best_constant"]["mean_reward"] < references["optimal"]["mean_reward"]
