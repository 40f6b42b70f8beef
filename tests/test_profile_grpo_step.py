"""benchmarks/profile_grpo_step.py on the tiny stand-in (on a CPU: host times only): every part of a step is found
in the profile, so that the GPU report splits a step the same way."""

import json
import os
from pathlib import Path

import preloaded_python

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "2", **os.environ}


def test_every_part_of_a_step_shows_in_the_profile(tmp_path):
    out = tmp_path / "profile.md"
    done = preloaded_python.shared(ROOT, ENV).run(
        ["benchmarks/profile_grpo_step.py", "--tiny", "--warm-steps", "1", "--profiled-steps", "2", "--run-dir",
         tmp_path / "runs", "--out", out], env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    parts = {row["part"]: row for row in result["parts"]}
    for part in ("generation", "log-probabilities without gradient", "log-probabilities for the loss", "rewards",
                 "backward (with the recompute)", "optimiser"):
        assert parts[part]["host_ms"] > 0, part
    assert result["steps"] == 2 and result["card"] == "CPU"
    assert result["tokens_per_step"] > result["completion_tokens_per_step"] > 0
    assert "| generation |" in out.read_text()


def test_kernels_are_sorted_into_kinds_by_name():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_grpo_step import kind_of

    assert kind_of("dequantize_kernel") == "MXFP4 dequantisation (Triton)"
    assert kind_of("transposed_matmul_kernel") == "MXFP4 matmuls (Triton)"
    assert kind_of("void cutlass::device_kernel<GroupProblemShape<...>>") == "grouped matmuls (torch)"
    assert kind_of("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT") == "matmuls (torch)"
    assert kind_of("triton_per_fused__log_softmax_0") == "elementwise, reductions, indexing"
    assert kind_of("something new") == "other"
