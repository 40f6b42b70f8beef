"""The rollout engine's CUDA graphs at the 20b shape, against transformers' generate and the training forward.

Needs a CUDA GPU with ~60 GB free and the 20b-shaped stand-in (built with the real tokenizer for real lengths):

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony
    python -m pytest tests/test_rollout_engine_gpu.py -v -s     # GPT_OSS_20B_DIR=... to use another model directory
"""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import harmony
from lora_fixtures import HARMONY_CSV, perturb_lora_b

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("GPT_OSS_20B_DIR", Path(__file__).resolve().parents[1] / "runs" / "stand-ins" /
                                "gpt-oss-20b-shape"))


@pytest.fixture(scope="module")
def setup():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no 20b-shaped model in {MODEL_DIR}: build it with `python tiny_gpt_oss.py --shape 20b`")
    from peft import LoraConfig, get_peft_model

    import model_loader
    from rollout_engine import RolloutEngine

    tokenizer = model_loader.load_tokenizer(str(MODEL_DIR))
    model = model_loader.load_model(str(MODEL_DIR), device="cuda")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.02)  # a live adapter, not PEFT's all-zero start
    prompts = pd.read_csv(HARMONY_CSV, keep_default_na=False)["prompt"].tolist()
    prompt_ids = tokenizer(text=prompts[:32])["input_ids"]
    return model, tokenizer, prompt_ids, RolloutEngine(model, tokenizer)


def forward_logprobs(model, prompts, completions, temperature):
    """Per-token log-probabilities of the completions from the model's plain forward (bf16, eager), as TRL's loss
    computes them: logits / temperature, log-softmax in fp32."""
    result = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion], device="cuda")
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
            result.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0].cpu())
    return result


def test_greedy_first_64_tokens_match_generate_for_31_of_32(setup):
    model, tokenizer, prompt_ids, engine = setup
    completions, _ = engine.generate(prompt_ids, 64, greedy=True)
    encoded = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to("cuda")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=64, min_new_tokens=64,
                             pad_token_id=tokenizer.pad_token_id)
    reference = out[:, encoded["input_ids"].shape[1]:].tolist()
    same = sum(c == r for c, r in zip(completions, reference))
    first_difference = [next((k for k, (a, b) in enumerate(zip(c, r)) if a != b), None)
                        for c, r in zip(completions, reference)]
    print(f"\ngreedy: {same}/32 identical; first differing position per row: {first_difference}")
    assert same >= 31


def test_sampled_logprobs_match_the_training_forward(setup):
    model, tokenizer, prompt_ids, engine = setup
    prompts = [ids for ids in prompt_ids[:4] for _ in range(8)]
    torch.manual_seed(1)
    completions, logprobs = engine.generate(prompts, 256, temperature=1.0)
    expected = forward_logprobs(model, prompts, completions, 1.0)
    diff = torch.cat([(torch.tensor(lp) - e).abs() for lp, e in zip(logprobs, expected)])
    print(f"\nsampled logprobs vs forward: mean |diff| {diff.mean():.4f}, p99 {diff.quantile(0.99):.4f}, "
          f"max {diff.max():.4f} over {diff.numel()} tokens")
    assert diff.mean() <= 0.02 and diff.quantile(0.99) <= 0.1


def test_the_captured_graph_sees_an_optimiser_step(setup):
    model, tokenizer, prompt_ids, engine = setup
    prompts = [ids for ids in prompt_ids[:4] for _ in range(8)]
    torch.manual_seed(2)
    completions, before = engine.generate(prompts, 64, temperature=1.0)
    states = dict(engine.graphs)
    graph_ids = {key: id(state.graph) for key, state in states.items()}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimiser = torch.optim.AdamW(lora, lr=1e-3)
    ids = torch.tensor([prompts[0] + completions[0]], device="cuda")
    logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1:-1].float()
    loss = -torch.log_softmax(logits, -1).gather(1, ids[0, len(prompts[0]):, None]).mean()
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    moved = forward_logprobs(model, prompts[:1], completions[:1], 1.0)[0]
    assert (moved - torch.tensor(before[0])).abs().mean() > 0.02  # the step changed the policy
    torch.manual_seed(3)
    completions, logprobs = engine.generate(prompts, 64, temperature=1.0)
    assert {key: id(state.graph) for key, state in engine.graphs.items()} == graph_ids  # replayed, not recaptured
    expected = forward_logprobs(model, prompts, completions, 1.0)
    diff = torch.cat([(torch.tensor(lp) - e).abs() for lp, e in zip(logprobs, expected)])
    print(f"\nafter the step: mean |diff| {diff.mean():.4f}, p99 {diff.quantile(0.99):.4f}")
    assert diff.mean() <= 0.02 and diff.quantile(0.99) <= 0.1


def test_completions_have_the_shape_trl_expects(setup):
    model, tokenizer, prompt_ids, engine = setup
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS}
    prompts = [ids for ids in prompt_ids[:4] for _ in range(8)]
    completions, logprobs = engine.generate(prompts, 96, temperature=1.0)
    assert len(completions) == len(logprobs) == 32
    for completion, lps in zip(completions, logprobs):
        assert 1 <= len(completion) == len(lps) <= 96
        assert not stop_ids & set(completion[:-1])
        assert len(completion) == 96 or completion[-1] in stop_ids
    assert len({tuple(c) for c in completions[:8]}) == 8  # one group's samples differ
