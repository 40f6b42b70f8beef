"""Tests for test_lora_adapter_quantized.py on a CPU: it must say MXFP4 kernels cannot run and what it did instead."""

import json

import pytest

import test_lora_adapter_quantized as quantized_script
from lora_fixtures import make_adapter, write_prompt_subset
from tiny_gpt_oss import ensure_tiny_model

ARGS = ["--samples", "2", "--max-new-tokens", "48", "--logit-prompts", "2"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    ensure_tiny_model()
    return write_prompt_subset(tmp_path_factory.mktemp("prompts") / "held_out.csv", rows=3)


@pytest.fixture(scope="module")
def attention_report(prompt_file, tmp_path_factory):
    run_dir = make_adapter(tmp_path_factory.mktemp("runs") / "attention-run")
    quantized_script.main(["--adapter-path", str(run_dir), "--prompt-path", str(prompt_file), *ARGS])
    return run_dir, json.loads((run_dir / "eval_quantized_report.json").read_text())


@pytest.fixture(scope="module")
def expert_report(prompt_file, tmp_path_factory):
    run_dir = make_adapter(tmp_path_factory.mktemp("runs") / "expert-run", expert_lora=True)
    quantized_script.main(["--adapter-path", str(run_dir), "--prompt-path", str(prompt_file), *ARGS])
    return run_dir, json.loads((run_dir / "eval_quantized_report.json").read_text())


def test_probe_says_why_mxfp4_cannot_run_on_a_cpu():
    available, why = quantized_script.probe_mxfp4_kernels("cpu")
    assert not available and "no CUDA GPU" in why


def test_cpu_run_evaluates_the_mxfp4_resident_base_and_says_so(attention_report):
    run_dir, report = attention_report
    assert report["mode"] == "mxfp4-experts"
    assert report["mxfp4_kernels"] == {"available": False, "reason": quantized_script.probe_mxfp4_kernels("cpu")[1]}
    assert "gpu_engine/mxfp4_experts.py" in report["what_was_done"] and "measured, not assumed" in report["what_was_done"]
    assert "mxfp4-experts" in (run_dir / "eval_quantized_summary.md").read_text()
    assert (run_dir / report["plots"]["action_counts"]).read_bytes()[:4] == b"\x89PNG"


def test_attention_only_adapter_on_mxfp4_experts_is_measured_not_copied(attention_report):
    """The MXFP4 variant is a second model run through other code (the packed experts' reference path): its logits
    differ from the dequantised model's by fp32 summation order only, never by nothing copied over."""
    _, report = attention_report
    for key in ("mxfp4_base", "mxfp4_adapter"):
        assert 0 < report["logits"][key]["max_abs_diff"] < 1e-4
        assert report["delta"][key]["same_action_rate"] == 1
    # the export only adds the merge's float rounding: its logits stay within float error of the reference
    assert report["logits"]["export_adapter"]["max_rel_diff"] < 1e-4
    assert report["export"]["changed_expert_weights"] == []


def test_an_expert_lora_adapter_runs_on_mxfp4_experts_and_is_measured(expert_report):
    """The expert LoRA beside the packed experts (low-rank terms): the same model as PEFT's W + BA on the
    dequantised reference, up to fp32 summation order; the export's rounding of the merged experts shows."""
    run_dir, report = expert_report
    assert report["mode"] == "mxfp4-experts"
    assert report["expert_lora"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert "low-rank terms" in report["what_was_done"]
    assert "mxfp4-experts" in (run_dir / "eval_quantized_summary.md").read_text()
    for key in ("mxfp4_base", "mxfp4_adapter"):
        assert 0 < report["logits"][key]["max_abs_diff"] < 1e-4
        assert report["delta"][key]["same_action_rate"] == 1
    assert len(report["export"]["changed_expert_weights"]) == 4  # 2 layers x (gate_up, down)
    assert report["logits"]["export_adapter"]["max_abs_diff"] > 1e-4  # MXFP4 rounding of the merged experts
