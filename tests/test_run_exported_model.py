"""Tests for run_exported_model.py: answers and parsed actions printed, bad input refused with exit code 2."""

import pytest

import run_exported_model as runner
from adapters import adapter_evaluation as ae
from lora_fixtures import write_prompt_subset
from tiny_gpt_oss import ensure_tiny_model


@pytest.fixture(scope="module")
def model_dir():
    """The tiny stand-in is itself a complete MXFP4 model directory, like an export."""
    return ensure_tiny_model()


def test_prints_final_answer_and_parsed_action_per_prompt(model_dir, tmp_path, capsys):
    prompts = write_prompt_subset(tmp_path / "held_out.csv", rows=2)
    runner.main(["--model-path", str(model_dir), "--prompt-path", str(prompts), "--max-new-tokens", "48"])
    out = capsys.readouterr().out
    assert out.count("--- prompt ") == 2
    assert out.count("final:") == 2 and out.count("action:") == 2 and out.count("best by Q:") == 2
    assert "valid answers" in out.splitlines()[-1]


def test_missing_export_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(tmp_path / "no-export")])
    assert exit_info.value.code == 2
    assert "no such model directory" in capsys.readouterr().err.strip().splitlines()[-1]


def test_prompt_file_without_needed_columns_exits_2(model_dir, tmp_path, capsys):
    bad = write_prompt_subset(tmp_path / "no_rewards.csv", drop_columns=[f"reward_action_{a}" for a in range(4)])
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(model_dir), "--prompt-path", str(bad)])
    assert exit_info.value.code == 2
    assert "reward_action_" in capsys.readouterr().err.strip().splitlines()[-1]


def test_hub_ids_are_told_apart_from_missing_local_paths():
    assert runner.resolve_model("someone/gpt-oss-tes") == "someone/gpt-oss-tes"
    with pytest.raises(ae.InputError):
        runner.resolve_model("runs/export/no-such-export")


def test_an_export_without_tokenizer_files_exits_2(model_dir, tmp_path, capsys):
    import shutil

    export = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, export, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(export)])
    assert exit_info.value.code == 2
    assert "no tokenizer" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_export_with_truncated_weights_exits_2(model_dir, tmp_path, capsys):
    import shutil

    export = tmp_path / "truncated"
    shutil.copytree(model_dir, export)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(export)])
    assert exit_info.value.code == 2
    assert "truncated" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [(["--max-prompts", "-1"], "--max-prompts must be at least 0"),
                                            (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1")])
def test_settings_out_of_range_exit_2(model_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(model_dir)] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_model_with_nan_logits_exits_2_with_one_message(model_dir, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-export"
    shutil.copytree(model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["lm_head.weight"] = torch.full_like(tensors["lm_head.weight"], float("nan"))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    prompts = write_prompt_subset(tmp_path / "held_out.csv", rows=1)
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--model-path", str(broken), "--prompt-path", str(prompts), "--max-new-tokens", "8"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "logits are NaN or infinite" in message and "export again" in message
