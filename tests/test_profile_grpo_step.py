"""benchmarks/profile_grpo_step.py on the tiny stand-in (on a CPU: host times only): every part of a step is found
in the profile, so that the GPU report splits a step the same way."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

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


def load_profile_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_grpo_step

    return profile_grpo_step


def test_kernels_are_sorted_into_kinds_by_name(monkeypatch):
    kind_of = load_profile_module(monkeypatch).kind_of
    assert kind_of("dequantize_kernel") == "MXFP4 dequantisation (Triton)"
    assert kind_of("transposed_matmul_kernel") == "MXFP4 matmuls (Triton)"
    assert kind_of("void cutlass::device_kernel<GroupProblemShape<...>>") == "grouped matmuls (torch)"
    assert kind_of("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT") == "matmuls (torch)"
    assert kind_of("triton_per_fused__log_softmax_0") == "elementwise, reductions, indexing"
    assert kind_of("something new") == "other"


def event(name, kernels=(), children=(), device="CPU", annotation=False, micros=0.0, host=0.0):
    """A stand-in for torch.autograd.profiler_util.FunctionEvent with the fields the split reads (what a CUDA
    profile holds cannot be made on a CPU)."""
    made = SimpleNamespace(name=name, kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
                           cpu_children=list(children), cpu_parent=None, is_async=False,
                           device_type=SimpleNamespace(name=device), is_user_annotation=annotation,
                           cpu_time_total=host, time_range=SimpleNamespace(elapsed_us=lambda: micros))
    for child in made.cpu_children:
        child.cpu_parent = made
    return made


def test_each_kernel_counts_once_in_the_part_that_launched_it(monkeypatch):
    module = load_profile_module(monkeypatch)
    from training.grpo_trainer import PROFILER_RANGES

    generation = event("grpo/generation", [("grpo/generation", 1000.0)],  # the range's own span on the GPU
                       [event("aten::mm", [("gemm_a", 300.0)])], host=900.0)
    rest = event("aten::add", [("elementwise_x", 50.0)],
                 [event("Optimizer.step#AdamW.step", [("multi_tensor_apply", 20.0)], host=5.0)])
    backward = event("autograd::engine::evaluate_function: MmBackward0", [("gemm_b", 400.0)], host=450.0)
    device = [event(name, device="CUDA", micros=micros) for name, micros in
              (("gemm_a", 300.0), ("elementwise_x", 50.0), ("multi_tensor_apply", 20.0), ("gemm_b", 400.0),
               ("orphan", 30.0))] + [event("grpo/generation", device="CUDA", annotation=True, micros=1000.0)]
    events = [generation, *generation.cpu_children, rest, *rest.cpu_children, backward, *device]
    parts = module.split_by_part(events, PROFILER_RANGES)
    kernels = {part: entry["kernels"] for part, entry in parts.items()}
    assert kernels == {"generation": [("gemm_a", 300.0)], "the rest": [("elementwise_x", 50.0)],
                       "optimiser": [("multi_tensor_apply", 20.0)],
                       "backward (with the recompute)": [("gemm_b", 400.0)],
                       "unattributed kernels": [("(kernels linked to no operation)", 30.0)]}
    assert parts["generation"]["host_us"] == 900.0 and parts["optimiser"]["host_us"] == 5.0
