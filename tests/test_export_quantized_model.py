"""Tests for export_quantized_model.py: round trip, quantisation report, atomic output, Hub push (mocked), bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import export_quantized_model as exporter
from gpu_engine import mxfp4
from adapters.adapter_merge import CheckpointReader
from lora_fixtures import copy_adapter, make_adapter, make_foreign_adapter, set_lora_b, write_prompt_subset
from tiny_gpt_oss import ensure_tiny_model

TOKEN = "hf_secret_token_for_tests_0123456789"


@pytest.fixture(scope="module")
def tiny_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_subset(tmp_path_factory.mktemp("prompts") / "held_out.csv", rows=3)


@pytest.fixture(scope="module")
def attention_run(tiny_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("runs") / "attention-run")


@pytest.fixture(scope="module")
def attention_export(attention_run, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "attention"
    report = exporter.main(["--adapter-path", str(attention_run), "--out", str(out), "--prompt-path", str(prompt_file),
                            "--verify-prompts", "2"])
    return out, report


@pytest.fixture(scope="module")
def expert_export(tiny_dir, prompt_file, tmp_path_factory):
    run = make_adapter(tmp_path_factory.mktemp("runs") / "expert-run", expert_lora=True)
    out = tmp_path_factory.mktemp("exports") / "expert"
    report = exporter.main(["--adapter-path", str(run), "--out", str(out), "--prompt-path", str(prompt_file),
                            "--verify-prompts", "2", "--allow-lossy", "true"])  # this adapter loses ~3/4 of its update
    return out, report


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    return exit_info.value.code, lines[-1] if lines else "", captured


def test_attention_only_export_keeps_expert_bytes_identical(attention_export, tiny_dir):
    out, report = attention_export
    base, export = CheckpointReader(tiny_dir), CheckpointReader(out)
    experts = [name for name in base.names() if name.endswith(("_blocks", "_scales"))]
    assert len(experts) == 8
    for name in experts:  # compared here independently of the exporter's own check
        assert torch.equal(export.get(name), base.get(name)), name
    assert report["experts_bit_identical_to_base"] and report["verified"]
    assert report["tensors"]["same_names"] and report["tensors"]["other_changed"] == 8  # q, k, v, o of 2 layers


def test_attention_only_export_reloads_with_equal_logits(attention_export):
    _, report = attention_export
    assert report["logits"]["reloaded_vs_stored_precision"]["max_rel_diff"] <= exporter.LOGIT_TOLERANCE
    assert report["logits"]["reloaded_vs_merged"]["argmax_agreement"] == 1.0
    assert report["quantization_error"] is None


def test_export_is_a_complete_mxfp4_model_directory(attention_export):
    out, report = attention_export
    mxfp4.check_mxfp4_checkpoint(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["experts_per_token"] == config["num_experts_per_tok"]
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 exporter.REPORT_FILE):
        assert (out / name).is_file(), name
    assert {"total", "load_and_merge", "write", "verify"} <= report["seconds"].keys()
    assert report["memory"]["peak_cpu_rss_gib"] > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_expert_lora_export_reports_quantisation_error(expert_export):
    _, report = expert_export
    error = report["quantization_error"]
    assert report["expert_lora"] and len(report["changed_expert_weights"]) == 4
    assert error["weights"] == 4 and 0 < error["weight_relative_error_max"] < 0.5
    assert 0 < error["update_relative_error_mean"]
    assert report["tensors"]["expert_changed"] == 8 and not report["experts_bit_identical_to_base"]
    assert report["logits"]["reloaded_vs_stored_precision"]["max_rel_diff"] <= exporter.LOGIT_TOLERANCE
    assert report["logits"]["reloaded_vs_merged"]["max_abs_diff"] > 0  # what MXFP4 rounding costs
    assert report["verified"]
    fidelity = report["fidelity"]
    assert list(report)[0] == "fidelity" and fidelity["verdict"] == "lossy"
    assert fidelity["expert_update_kept"] == pytest.approx(1 - error["update_relative_error_mean"])
    assert fidelity["summary"].startswith(f"lossy: MXFP4 keeps {fidelity['expert_update_kept']:.0%} of the expert")


def test_summary_and_report_lead_with_what_survives(attention_export, capsys):
    _, report = attention_export
    assert list(report)[0] == "fidelity" and report["fidelity"]["verdict"] == "exact"
    assert report["fidelity"]["expert_update_kept"] is None
    assert report["fidelity"]["vs_merged_bf16"]["argmax_agreement"] == 1.0


def test_an_export_names_the_format_it_writes(attention_run, prompt_file, tmp_path, capsys):
    """'auto' chooses how a model is held while it runs; an export must say which format it writes."""
    out = tmp_path / "exports" / "auto"
    code, message, _ = run_main(["--adapter-path", str(attention_run), "--out", str(out), "--prompt-path",
                                 str(prompt_file), "--experts-format", "auto"], capsys)
    assert code != 0 and "--experts-format 'auto'" in message and "'mxfp4' or 'bf16'" in message
    assert not out.exists()


def test_an_export_that_would_lose_the_expert_update_is_refused_naming_both_ways_on(tiny_dir, prompt_file, tmp_path,
                                                                                    capsys):
    """An expert update far below half an MXFP4 step (LoRA B scaled to 1e-6) rounds away entirely: the export stops
    before writing anything, says what it measured and offers --experts-format bf16 and --allow-lossy true."""
    run = make_adapter(tmp_path / "faint-run", expert_lora=True, scale=1e-6)
    out = tmp_path / "exports" / "faint"
    message, _, _ = run_main(["--adapter-path", str(run), "--out", str(out), "--prompt-path", str(prompt_file),
                              "--verify-prompts", "2"], capsys)  # SystemExit("error: ..."): exit status 1
    assert message.startswith("error: ")
    assert "MXFP4 rounding loses too much of what expert LoRA learned" in message and "0% of it kept" in message
    assert "--experts-format bf16" in message and "--allow-lossy true" in message
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    lossy = exporter.main(["--adapter-path", str(run), "--out", str(out), "--prompt-path", str(prompt_file),
                           "--verify-prompts", "2", "--allow-lossy", "true"])
    assert lossy["fidelity"]["verdict"] == "lossy" and lossy["fidelity"]["expert_update_kept"] < 0.05
    assert lossy["verified"] and (out / "config.json").is_file()


def test_bf16_experts_export_round_trips_exactly(tiny_dir, prompt_file, tmp_path):
    """--experts-format bf16: plain bf16 experts, no quantization_config, and the reloaded logits equal the merged
    model's (fp32 logits of the same bf16 weights); the tensor names are the base's with plain expert weights."""
    import model_loader
    from adapters.adapter_merge import prompt_logits

    run = make_adapter(tmp_path / "expert-run", expert_lora=True)
    out = tmp_path / "exports" / "bf16"
    report = exporter.main(["--adapter-path", str(run), "--out", str(out), "--prompt-path", str(prompt_file),
                            "--verify-prompts", "2", "--experts-format", "bf16"])
    assert report["verified"] and report["fidelity"]["verdict"] == "exact" and report["experts_format"] == "bf16"
    assert report["tensors"]["same_names"] and report["quantization_error"] is None
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["experts_per_token"] == config["num_experts_per_tok"]
    export = CheckpointReader(out)
    assert not [name for name in export.names() if name.endswith(("_blocks", "_scales"))]
    assert export.get("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.bfloat16
    # independently of the exporter's own check: the merged adapter against the reloaded directory
    from adapters.adapter_evaluation import load_adapted_model

    merged, tokenizer = load_adapted_model(run, "tiny", device="cpu", dtype=torch.bfloat16)
    merged = merged.merge_and_unload()
    prompts = [prompt_file.read_text().splitlines()[1][:400]]
    reloaded = model_loader.load_model(str(out), dtype=torch.bfloat16)
    for a, b in zip(prompt_logits(merged, tokenizer, prompts), prompt_logits(reloaded, tokenizer, prompts)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_interrupted_export_leaves_neither_target_nor_temporary(attention_run, prompt_file, tmp_path, monkeypatch):
    calls = []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted while writing the second shard")
        return mxfp4_save_file(tensors, path, metadata=metadata)

    mxfp4_save_file = mxfp4.save_file
    monkeypatch.setattr(mxfp4, "save_file", save_then_fail)
    parent = tmp_path / "exports"
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(["--adapter-path", str(attention_run), "--out", str(parent / "model"), "--prompt-path",
                       str(prompt_file), "--verify-prompts", "1", "--max-shard-bytes", "50000"])
    assert "interrupted: nothing was published" in str(exit_info.value.code)  # a message, not a traceback
    assert len(calls) == 2  # it did stop mid-way
    assert list(parent.iterdir()) == []


def test_existing_export_is_refused_without_overwrite(attention_export, attention_run, capsys):
    out, _ = attention_export
    before = (out / exporter.REPORT_FILE).read_bytes()
    code, message, _ = run_main(["--adapter-path", str(attention_run), "--out", str(out)], capsys)
    assert code == 2 and "already holds an export" in message and "--overwrite" in message
    assert (out / exporter.REPORT_FILE).read_bytes() == before


def test_overwrite_replaces_an_existing_export(attention_run, prompt_file, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    for stale in (".model.partial-ab12cd34", ".model.partial-999999999-ab12cd34"):  # left by killed exports
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    report = exporter.main(["--adapter-path", str(attention_run), "--out", str(out), "--overwrite", "true",
                            "--prompt-path", str(prompt_file), "--verify-prompts", "1"])
    assert report["verified"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_oss"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the stale partial exports removed too


ROOT = Path(__file__).resolve().parents[1]
KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import export_quantized_model
rename, calls = os.replace, []
def killing_replace(source, target):
    calls.append(source)
    if len(calls) == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as with a real kill
    rename(source, target)
os.replace = killing_replace
export_quantized_model.publish(Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3])  # before the 'ready' rename, between old-aside and new-in, after
def test_an_overwrite_killed_between_its_renames_leaves_a_complete_export_after_the_next_run(tmp_path, kill_at):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("old export")
    new = tmp_path / ".model.partial-999999999-ab12"  # a finished export in its temporary directory (a dead pid)
    new.mkdir()
    (new / "model.safetensors").write_text("new export")
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(ROOT), str(new), str(out), str(kill_at)])
    assert killed.returncode == -signal.SIGKILL
    if kill_at == 3:  # killed in the middle of the swap: nothing at the target
        assert not out.exists()
    messages = []
    exporter.recover_interrupted_publish(out, messages.append)
    exporter.remove_stale_partials(out, messages.append)
    expected = "old export" if kill_at == 1 else "new export"  # a finished export that was not yet 'ready' is lost
    assert (out / "model.safetensors").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_push_creates_private_repo_and_uploads_without_printing_the_token(attention_run, prompt_file, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_REPO_ID", "someone/gpt-oss-tes")
    out = tmp_path / "model"
    with mock.patch("huggingface_hub.HfApi") as api_class:
        report = exporter.main(["--adapter-path", str(attention_run), "--out", str(out), "--push-to-hub", "true",
                                "--prompt-path", str(prompt_file), "--verify-prompts", "1"])
    api_class.assert_called_once_with(token=TOKEN)
    api = api_class.return_value
    api.create_repo.assert_called_once_with("someone/gpt-oss-tes", private=True, exist_ok=True, repo_type="model")
    api.upload_folder.assert_called_once()
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(out)
    assert api.upload_folder.call_args.kwargs["repo_id"] == "someone/gpt-oss-tes"
    assert report["pushed_to"] == "https://huggingface.co/someone/gpt-oss-tes"
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert TOKEN not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix in (".json", ".jinja"))


def test_push_without_token_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_REPO_ID", "someone/gpt-oss-tes")
    code, message, _ = run_main(["--adapter-path", str(tmp_path / "not-even-a-run"), "--out", str(tmp_path / "out"),
                                 "--push-to-hub", "true"], capsys)
    assert code == 2 and "HF_TOKEN" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_adapter_directory_exits_2(tmp_path, capsys):
    code, message, _ = run_main(["--adapter-path", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no such adapter directory" in message
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_exits_2(tiny_dir, tmp_path, capsys):
    foreign = make_foreign_adapter(tmp_path / "foreign-run", tiny_dir, hidden_size=128)
    code, message, _ = run_main(["--adapter-path", str(foreign), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "does not fit the base model" in message
    assert not (tmp_path / "out").exists()


def test_prompt_file_without_needed_columns_exits_2(attention_run, tmp_path, capsys):
    bad = write_prompt_subset(tmp_path / "no_prompt.csv", drop_columns=["prompt"])
    code, message, _ = run_main(["--adapter-path", str(attention_run), "--out", str(tmp_path / "out"),
                                 "--prompt-path", str(bad)], capsys)
    assert code == 2 and "not usable as a prompt file" in message and "prompt" in message
    assert not (tmp_path / "out").exists()


def test_nan_adapter_weights_are_refused_before_anything_is_written(attention_run, prompt_file, tmp_path, capsys):
    broken = set_lora_b(copy_adapter(attention_run, tmp_path / "nan-run"), float("nan"))
    out = tmp_path / "exports" / "model"
    code, message, _ = run_main(["--adapter-path", str(broken), "--out", str(out), "--prompt-path",
                                 str(prompt_file), "--verify-prompts", "1"], capsys)
    assert code == 2 and "hold NaN or infinite values" in message and "training diverged" in message
    assert not (tmp_path / "exports").exists()


def test_an_adapter_that_makes_the_logits_non_finite_is_never_published(attention_run, prompt_file, tmp_path,
                                                                         capsys):
    broken = set_lora_b(copy_adapter(attention_run, tmp_path / "huge-run"), 1e30)  # finite weights, inf logits
    out = tmp_path / "exports" / "model"
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(["--adapter-path", str(broken), "--out", str(out), "--prompt-path", str(prompt_file),
                       "--verify-prompts", "1"])
    assert "logits are NaN or infinite" in str(exit_info.value.code) and "Nothing was written" in str(
        exit_info.value.code)
    assert not out.parent.exists()  # not even a temporary directory


def test_export_report_is_strict_json(attention_export):
    out, _ = attention_export
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((out / exporter.REPORT_FILE).read_text(), parse_constant=refuse)
    assert report["verified"] and report["problems"] == []


def test_push_without_network_says_what_was_written_and_how_to_push(attention_run, prompt_file, tmp_path,
                                                                    monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "model"
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(["--adapter-path", str(attention_run), "--out", str(out), "--push-to-hub", "true",
                       "--hf-repo-id", "someone/gpt-oss-tes", "--prompt-path", str(prompt_file),
                       "--verify-prompts", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: pushing to the Hub repo someone/gpt-oss-tes failed")
    assert f"complete and verified in {out}" in message and "hf upload someone/gpt-oss-tes" in message
    assert json.loads((out / exporter.REPORT_FILE).read_text())["verified"]
    captured = capsys.readouterr()
    assert TOKEN not in message + captured.out + captured.err


def test_an_output_path_under_a_file_or_in_a_read_only_directory_exits_2(attention_run, tmp_path, read_only_dir,
                                                                          capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, message, _ = run_main(["--adapter-path", str(attention_run), "--out", str(a_file / "model")], capsys)
    assert code == 2 and "is a file, so nothing can be created under it" in message
    code, message, _ = run_main(["--adapter-path", str(attention_run), "--out", str(read_only_dir / "model")],
                                capsys)
    assert code == 2 and "cannot be written" in message


def test_a_refused_export_still_cleans_up_what_a_killed_one_left_and_says_so(attention_run, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("an export")  # refused below: no --overwrite
    old = tmp_path / ".model.old-abc123"
    (old / "model").mkdir(parents=True)
    (old / "model" / "model.safetensors").write_text("model-sized leftovers")
    with pytest.raises(SystemExit):
        exporter.main(["--adapter-path", str(attention_run), "--out", str(out)])
    said = capsys.readouterr()
    assert "already holds an export" in said.err and "removed .model.old-abc123" in said.out + said.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "model.safetensors").read_text() == "an export"
