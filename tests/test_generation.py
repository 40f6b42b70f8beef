"""training/generation.py: which back end samples (one 'auto' rule, settings checked before loading), what TRL is
told for it, and the Generator that owns the engine and lets go of its memory around validation and evaluation."""

import pytest
import torch

from test_rollout_engine import make_model, prompt_ids, tokenizer  # noqa: F401  (fixtures)
from training import generation


def test_generation_backend_settings_are_checked(tmp_path):
    import train_grpo

    with pytest.raises(SystemExit, match="GENERATION_BACKEND: generation back end 'vllm' is not one of"):
        train_grpo.main(["--tiny", "--generation-backend", "vllm", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="continuous-batching needs a CUDA GPU"):
        train_grpo.main(["--tiny", "--generation-backend", "continuous-batching", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


def test_one_auto_rule_asks_whether_the_engine_runs_the_model(tokenizer):
    """generation.resolve: 'auto' is the engine on a GPU only for a model rollout_engine.supports, generate on a CPU
    and for anything else (training and evaluation ask the same function); prompts are tokenised one way."""
    model = make_model(expert_lora=False, device="cpu")
    assert generation.resolve("auto", model, "cpu") == "generate"
    assert generation.resolve("auto", model, "cuda") == "engine"
    assert generation.resolve("auto", torch.nn.Linear(2, 2), "cuda") == "generate"  # not a gpt-oss the engine runs
    assert generation.resolve("engine", model, "cpu") == "engine"
    # evaluation passes the model's own device, "cuda:0": continuous batching is kept (and samples with generate)
    assert generation.resolve("continuous-batching", model, torch.device("cuda", 0)) == "continuous-batching"
    assert generation.BACKENDS["continuous-batching"].evaluation_sampler == "generate"
    with pytest.raises(ValueError, match="vllm"):
        generation.resolve("vllm", model, "cpu")
    text = "<|start|>user<|message|>hi<|end|><|start|>assistant"
    assert generation.tokenize_prompts(tokenizer, [text])[0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert generation.Generator("generate", model, tokenizer).rollout_func() is None
    assert generation.Generator("engine", model, tokenizer).rollout_func() is not None


def test_continuous_batching_is_sized_to_the_step():
    settings = {"PROMPTS_PER_STEP": 4, "NUM_GENERATIONS": 8, "MAX_PROMPT_LEN": 1024, "MAX_COMPLETION_LEN": 256}
    config = generation.trl_settings("continuous-batching", settings)["transformers_continuous_batching_config"]
    assert generation.trl_settings("engine", settings) == {"use_transformers_continuous_batching": False,
                                                           "transformers_continuous_batching_config": None}
    assert config["num_blocks"] * config["block_size"] >= 32 * (1024 + 256)  # every completion fits at once
    assert config["max_batch_tokens"] <= 4096  # no 16 GiB prefill logits


def test_validation_and_evaluation_let_go_of_the_engines_caches_before_and_after(tokenizer, prompt_ids, monkeypatch):
    """evaluation.generate_answers (checkpoint validation, the held-out evaluation) starts with training's caches
    released and leaves none of its own: neither phase holds memory the other needs (training/memory_plan.py)."""
    from training import evaluation

    model = make_model(False, "cpu")
    generator = generation.Generator("engine", model, tokenizer)
    engine = generator.rollout_engine()
    engine.generate(prompt_ids[:2], 4)  # a training rollout's cache
    seen = []
    real_generate = engine.generate
    monkeypatch.setattr(engine, "generate",
                        lambda *a, **k: (seen.append(len(engine.graphs)), real_generate(*a, **k))[1])
    prompts = [tokenizer.decode(ids) for ids in prompt_ids[:3]]
    evaluation.generate_answers(model, tokenizer, prompts, samples=2, max_new_tokens=4, batch_size=4,
                                generator=generator)
    assert seen == [0, 1] and not engine.graphs and not engine.weight_sets


def test_the_engine_stops_where_the_generator_is_told_to(tokenizer, prompt_ids):
    """A Generator's stop ids reach the engine: a completion ends at the first of them, whatever harmony's are."""
    model = make_model(expert_lora=False, device="cpu")
    prompts = [tokenizer.decode(ids) for ids in prompt_ids[:2]]
    torch.manual_seed(0)
    free = generation.Generator("engine", model, tokenizer, stop_ids=[-1]).sample(prompts, 1.0, 1.0, 12)
    stop = free[0][3]  # a token the first completion samples after three others
    torch.manual_seed(0)
    stopped = generation.Generator("engine", model, tokenizer, stop_ids=[stop]).sample(prompts, 1.0, 1.0, 12)
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    for ids in stopped:
        assert stop not in ids[:-1]
