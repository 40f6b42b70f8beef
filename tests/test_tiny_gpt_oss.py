"""The stand-in checkpoints: the tiny one behaves like a small pretrained gpt-oss, the 20b one has the real shape."""

import json

import pandas as pd
import pytest
import torch

import harmony
import model_loader
import tiny_gpt_oss
from training.evaluation import generate_answers, parse_answers
from gpu_engine.mxfp4 import check_mxfp4_checkpoint

DATA = tiny_gpt_oss.ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset_harmony.csv"


@pytest.fixture(scope="module")
def tiny_dir():
    return tiny_gpt_oss.ensure_tiny_model()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return model_loader.load_model("tiny"), model_loader.load_tokenizer("tiny")


def test_tiny_is_a_complete_mxfp4_gpt_oss_directory(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["hidden_size"] % 32 == 0 and config["intermediate_size"] % 32 == 0
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["num_experts_per_tok"] >= 2
    check_mxfp4_checkpoint(tiny_dir)  # expert blocks/scales present, uint8, right shapes


def test_tiny_loads_through_the_shared_loader_dequantised_with_eager_attention(tiny):
    model, _ = tiny
    assert model.config.model_type == "gpt_oss"
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} <= {torch.float32, torch.bfloat16}
    assert getattr(model.config, "quantization_config", None) is None  # dequantised: PEFT and the Trainer accept it
    assert any(name.endswith("self_attn.sinks") for name, _ in model.named_parameters())
    assert 5e4 < sum(p.numel() for p in model.parameters()) < 1e6


def test_special_tokens_are_single_ids_that_the_template_and_generation_config_agree_on(tiny, tiny_dir):
    _, tokenizer = tiny
    for token in harmony.SPECIAL_TOKEN_IDS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS]
    assert tokenizer.eos_token == "<|return|>" and tokenizer.pad_token == "<|endoftext|>"


def test_a_data_prompt_renders_through_the_chat_template(tiny):
    _, tokenizer = tiny
    legacy = pd.read_csv(str(DATA).replace("_harmony", ""), keep_default_na=False)["prompt"][0]
    text = harmony.render_prompt(tokenizer, legacy, "low", "2025-05-05")
    assert text.startswith("<|start|>system<|message|>") and text.endswith("<|start|>assistant")
    assert "Current date: 2025-05-05" in text and "Reasoning: low" in text
    assert harmony.DEVELOPER_INSTRUCTIONS in text and legacy in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|start|>")) == 4  # system, developer, user, assistant


def test_tiny_answers_in_harmony_at_least_90_percent_of_the_time_with_near_uniform_actions(tiny):
    model, tokenizer = tiny
    frame = pd.read_csv(DATA, keep_default_na=False)
    prompts = frame.loc[frame["split"] == "eval", "prompt"].tolist()[:150]
    answers = generate_answers(model, tokenizer, prompts, samples=2, temperature=1.0, max_new_tokens=64, seed=7)
    actions = parse_answers(answers, 4).ravel()
    valid = actions[actions >= 0]
    assert len(valid) / len(actions) >= 0.90
    shares = torch.bincount(torch.tensor(valid), minlength=4).float() / len(valid)
    assert shares.min() > 0.12 and shares.max() < 0.40, shares  # knows the format, not the policy
    assert any("<|channel|>analysis<|message|>" in a for row in answers for a in row)


def test_an_interrupted_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_gpt_oss, "WARM_STEPS", 2)
    monkeypatch.setattr(tiny_gpt_oss, "WARM_QUANTIZED_STEPS", 1)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_gpt_oss, "publish", fail)
    with pytest.raises(KeyboardInterrupt):
        tiny_gpt_oss.build_tiny(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []
    assert not tiny_gpt_oss.is_current(tmp_path / "tiny")


def test_the_same_recipe_gives_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_gpt_oss, "WARM_STEPS", 3)
    monkeypatch.setattr(tiny_gpt_oss, "WARM_QUANTIZED_STEPS", 2)
    first = tiny_gpt_oss.build_tiny(tmp_path / "a")
    second = tiny_gpt_oss.build_tiny(tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


PUBLISHED_20B = {  # openai/gpt-oss-20b config.json
    "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "attention_bias": True, "swiglu_limit": 7.0, "tie_word_embeddings": False, "eos_token_id": 200002,
    "pad_token_id": 199999, "router_aux_loss_coef": 0.9,
}


def test_the_20b_shape_equals_the_published_config_on_the_meta_device():
    from transformers import GptOssForCausalLM

    config = tiny_gpt_oss.gpt_oss_20b_config()
    for key, value in PUBLISHED_20B.items():
        assert getattr(config, key) == value, key
    assert config.layer_types == ["sliding_attention", "full_attention"] * 12
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0 and rope["rope_theta"] == 150000.0
    assert rope["original_max_position_embeddings"] == 4096
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == model_loader.count_parameters(config) and 20.8e9 < n < 21.0e9


def test_a_config_without_a_bos_id_as_the_published_20bs_trains_without_the_trainers_token_notice(tiny):
    """gpt-oss-20b's config.json has no bos_token_id: the Trainer fills it from the tokenizer and, unless the loader
    drops that notice, tells every run about it in the middle of its own lines."""
    import logging

    from transformers.trainer_utils import align_special_tokens

    model, tokenizer = tiny
    assert tiny_gpt_oss.gpt_oss_20b_config().bos_token_id is None
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.trainer_utils")
    logger.addHandler(handler)
    bos = model.config.bos_token_id, model.generation_config.bos_token_id
    pad = model.config.pad_token_id, model.generation_config.pad_token_id
    try:
        model.config.bos_token_id = model.generation_config.bos_token_id = None
        model_loader.load_model("tiny")  # the loader sets the filters, as before every run
        align_special_tokens(model, tokenizer)
        assert model.config.bos_token_id == tokenizer.bos_token_id and not records  # aligned, and not said
        model.config.pad_token_id = model.generation_config.pad_token_id = 0
        align_special_tokens(model, tokenizer)  # a PAD the tokenizer changes is still said
        assert len(records) == 1 and "'pad_token_id'" in records[0].getMessage()
    finally:
        logger.removeHandler(handler)
        model.config.bos_token_id, model.generation_config.bos_token_id = bos
        model.config.pad_token_id, model.generation_config.pad_token_id = pad


def test_the_20b_tokenizer_keeps_the_real_harmony_ids():
    tokenizer = tiny_gpt_oss.build_tokenizer(tiny_gpt_oss.read_training_prompts()[:200], real_ids=True)
    assert len(tokenizer) == 201088
    for token, token_id in harmony.SPECIAL_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    text = harmony.format_answer("CO2 is low now.", 2)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_20b_model_on_a_machine_without_gpu_points_at_tiny(tmp_path, monkeypatch):
    from gpu_engine.mxfp4 import mxfp4_quantization_config

    config = tiny_gpt_oss.gpt_oss_20b_config().to_dict()
    config["quantization_config"] = mxfp4_quantization_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(model_loader.ModelLoadError, match="--tiny"):
        model_loader.load_model(str(tmp_path))


def test_a_model_directory_without_config_or_of_another_model_is_named(tmp_path):
    with pytest.raises(model_loader.ModelLoadError, match="no config.json"):
        model_loader.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(model_loader.ModelLoadError, match="expected 'gpt_oss'"):
        model_loader.load_model(str(tmp_path))


def test_a_build_gets_the_modes_of_the_umask_so_other_users_can_read_it(tmp_path):
    """mkdtemp makes its directory 0700 and safetensors may write 0600: another user's `--tiny` could not read it."""
    import os

    from tiny_gpt_oss import write_then_publish

    def write(directory):
        (directory / "config.json").write_text("{}")
        descriptor = os.open(directory / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(descriptor)

    old = os.umask(0o022)
    try:
        out = write_then_publish(tmp_path / "stand-in", write) or tmp_path / "stand-in"
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"config.json": 0o644,
                                                                       "model.safetensors": 0o644}
