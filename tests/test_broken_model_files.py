"""A broken model directory (a safetensors header that is not JSON, an index that is not JSON, a shard it names
missing) is one message naming the file, with exit code 2, in every script that loads a model: never a library's
traceback, and nothing written."""

import shutil

import pytest

import export_quantized_model
import model_loader
import run_exported_model
import test_lora_adapter
from lora_fixtures import make_adapter, write_prompt_subset
from tiny_gpt_oss import ensure_tiny_model


def break_header(directory):
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"{not json at all"  # inside the JSON header
    weights.write_bytes(bytes(data))
    return weights


def break_index(directory):
    index = directory / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"lm_head.weight": "model.safetensors",')  # cut off
    return index


def lose_a_shard(directory):
    index = directory / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}')
    return directory / "model-00002-of-00002.safetensors"


DAMAGE = {"header": break_header, "index": break_index, "shard": lose_a_shard}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(params=list(DAMAGE))
def broken(request, tmp_path):
    """(a copy of the tiny stand-in with one kind of damage, the file to name)."""
    directory = tmp_path / f"broken-{request.param}"
    shutil.copytree(ensure_tiny_model(), directory)
    return directory, DAMAGE[request.param](directory)


def last_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_the_loader_names_the_broken_file(broken):
    directory, file = broken
    with pytest.raises(model_loader.ModelLoadError, match=str(file.name)):
        model_loader.load_model(str(directory), device="cpu")


def test_run_exported_model_names_the_broken_file(broken, tmp_path, capsys):
    directory, file = broken
    prompts = write_prompt_subset(tmp_path / "held_out.csv", rows=1)
    with pytest.raises(SystemExit) as exit_info:
        run_exported_model.main(["--model-path", str(directory), "--prompt-path", str(prompts)])
    assert exit_info.value.code == 2 and str(file) in last_error(capsys)


def test_test_lora_adapter_names_the_broken_base(broken, run_dir, capsys):
    directory, file = broken
    with pytest.raises(SystemExit) as exit_info:
        test_lora_adapter.main(["--adapter-path", str(run_dir), "--base-model-id", str(directory)])
    assert exit_info.value.code == 2 and str(file) in last_error(capsys)


def test_the_export_names_the_broken_base_and_writes_nothing(broken, run_dir, tmp_path, capsys):
    directory, file = broken
    out = tmp_path / "exports" / "model"
    with pytest.raises(SystemExit) as exit_info:
        export_quantized_model.main(["--adapter-path", str(run_dir), "--base-model-id", str(directory),
                                     "--out", str(out)])
    assert exit_info.value.code == 2 and str(file) in last_error(capsys)
    assert not out.parent.exists() or not any(out.parent.iterdir())
