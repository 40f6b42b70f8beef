"""The rollout engine's CUDA graphs at the 20b shape, against the training forward pass.

The random-weight stand-in is numerically chaotic in bf16 (benchmarks/RESULTS.md): a rounding difference of one
unit in one activation grows into visible log-probability differences a few dozen tokens later, and greedy
sequences of two correct implementations part within a few tokens. So the engine is measured against what a
correct decoder achieves on this model: transformers' own `generate` (its KV-cache decode, sampled in the same
way), compared with the same training forward. The engine may be no further from the forward than twice that
(or 0.02); its exactness is tested in fp32 in tests/test_rollout_engine.py.

Each test runs with the experts in bf16 and in MXFP4 (gpu_engine/mxfp4_experts.py). Needs a CUDA GPU with ~60 GB free and the 20b-shaped stand-in (built with the real tokenizer for real lengths):

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony
    python -m pytest tests/test_rollout_engine_gpu.py -v -s     # GPT_OSS_20B_DIR=... to use another model directory
"""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import harmony
from lora_fixtures import HARMONY_CSV
from gpu_engine.rollout_engine import cut_at_stop

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("GPT_OSS_20B_DIR", Path(__file__).resolve().parents[1] / "runs" / "stand-ins" /
                                "gpt-oss-20b-shape"))


@pytest.fixture(scope="module", params=["bf16", "mxfp4", "mxfp4 + expert LoRA"])
def setup(request):
    """The 20b stand-in with its experts dequantised to bf16, or kept in MXFP4 (gpu_engine/mxfp4_experts.py), under a LoRA on
    attention (and, for the third, on the MXFP4 experts as low-rank terms: gpu_engine/expert_lora.py)."""
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no 20b-shaped model in {MODEL_DIR}: build it with `python tiny_gpt_oss.py --shape 20b`")
    from peft import LoraConfig, get_peft_model

    from gpu_engine import expert_lora
    import model_loader
    from gpu_engine.rollout_engine import RolloutEngine

    experts_format, _, expert_adapter = request.param.partition(" + ")
    tokenizer = model_loader.load_tokenizer(str(MODEL_DIR))
    model = model_loader.load_model(str(MODEL_DIR), device="cuda", experts_format=experts_format)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                        target_parameters=expert_lora.EXPERT_TARGETS if expert_adapter else None)
    model = get_peft_model(model, expert_lora.register(config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.02)  # a live adapter, not PEFT's all-zero start
    prompts = pd.read_csv(HARMONY_CSV, keep_default_na=False)["prompt"].tolist()
    prompt_ids = tokenizer(text=prompts[:32])["input_ids"]
    return model, tokenizer, prompt_ids, RolloutEngine(model, tokenizer)


def forward_logprobs(model, prompts, completions, temperature, batch=1):
    """Per-token log-probabilities of the completions from the model's forward as TRL's loss computes them (the
    loader's attention: sink_attention on a GPU), under the bf16 autocast that accelerate wraps the trainer's
    forward in (`bf16=True`), logits / temperature, log-softmax in fp32; `batch` sequences right-padded per
    forward."""
    result = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for first in range(0, len(prompts), batch):
            seqs = [p + c for p, c in zip(prompts[first:first + batch], completions[first:first + batch])]
            width = max(len(q) for q in seqs)
            ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs], device="cuda")
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device="cuda")
            logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
            for k, (prompt, completion) in enumerate(zip(prompts[first:first + batch],
                                                         completions[first:first + batch])):
                part = torch.log_softmax(logits[k, len(prompt) - 1:len(prompt) + len(completion) - 1], -1)
                result.append(part.gather(1, ids[k, len(prompt):len(prompt) + len(completion), None])[:, 0].cpu())
    return result


def generate_logprobs(model, tokenizer, prompts, new_tokens):
    """transformers' `generate` (sampling at temperature 1, no top-k / top-p) under the same autocast: its completions
    and the log-probability of each sampled token from the logits it decoded with."""
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS]
    encoded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, encoded["input_ids"].shape[1]:]
    logprobs = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)
    logprobs = logprobs.gather(2, tokens[:, :, None])[:, :, 0]
    return cut_at_stop(tokens.tolist(), logprobs.tolist(), stop_ids)


def transformers_tolerance(model, tokenizer, prompts, new_tokens, label):
    """How far the engine may be from the training forward: twice what transformers' own `generate` is off from
    the same forward on the same prompts (or 0.02)."""
    torch.manual_seed(4)
    reference, reference_logprobs = generate_logprobs(model, tokenizer, prompts, new_tokens)
    reference_error = mean_difference(reference_logprobs, forward_logprobs(model, prompts, reference, 1.0))
    print(f"\n{label}: transformers' generate vs forward {reference_error:.4f}")
    return max(0.02, 2 * reference_error)


def assert_engine_within(tolerance, model, prompts, completions, logprobs, label):
    engine_error = mean_difference(logprobs, forward_logprobs(model, prompts, completions, 1.0))
    print(f"{label}: engine vs forward {engine_error:.4f} (tolerance {tolerance:.4f})")
    assert engine_error <= tolerance


def mean_difference(a, b):
    return torch.cat([(torch.as_tensor(x) - y).abs() for x, y in zip(a, b)]).mean().item()


def test_sampled_logprobs_match_the_training_forward(setup):
    model, tokenizer, prompt_ids, engine = setup
    prompts = [ids for ids in prompt_ids[:4] for _ in range(8)]
    torch.manual_seed(1)
    completions, logprobs = engine.generate(prompts, 256, temperature=1.0)
    tolerance = transformers_tolerance(model, tokenizer, prompts, 256, "sampled logprobs")
    assert_engine_within(tolerance, model, prompts, completions, logprobs, "sampled logprobs")


def test_the_captured_graph_sees_an_optimiser_step(setup):
    model, tokenizer, prompt_ids, engine = setup
    prompts = [ids for ids in prompt_ids[:4] for _ in range(8)]
    torch.manual_seed(2)
    completions, _ = engine.generate(prompts, 64, temperature=1.0)
    graph_ids = {key: id(state.graph) for key, state in engine.graphs.items()}
    before_step = forward_logprobs(model, prompts[:8], completions[:8], 1.0)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimiser = torch.optim.AdamW(lora, lr=1e-3)
    ids = torch.tensor([prompts[0] + completions[0]], device="cuda")
    logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1:-1].float()
    loss = -torch.log_softmax(logits, -1).gather(1, ids[0, len(prompts[0]):, None]).mean()
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    moved = mean_difference(forward_logprobs(model, prompts[:8], completions[:8], 1.0), before_step)
    tolerance = transformers_tolerance(model, tokenizer, prompts, 64, "after the step")
    print(f"the step moved the forward's log-probabilities by {moved:.4f}")
    assert moved > tolerance  # so a rollout that missed the step could not pass
    torch.manual_seed(3)
    completions, logprobs = engine.generate(prompts, 64, temperature=1.0)
    assert {key: id(state.graph) for key, state in engine.graphs.items()} == graph_ids  # replayed, not recaptured
    assert_engine_within(tolerance, model, prompts, completions, logprobs, "after the step")


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


def test_the_attention_kernel_reads_only_the_keys_in_range_and_matches_the_plain_path():
    """decode_attention (gpu_engine/decode_attention_kernel.py) at gpt-oss-20b's head shape, for a full and a sliding layer,
    rows at positions before, at and past the window: against attend_one's math in fp32 it is no further than
    the plain bf16 path (batched matmuls over the masked cache) is, and it reads nothing outside the keys in
    range (NaN there changes nothing)."""
    from gpu_engine.decode_step import Keys, additive_mask, attend_one, expand_mask

    torch.manual_seed(0)
    rows, kv, groups, d, length, window, scaling = 6, 8, 8, 64, 640, 128, 0.125
    q = torch.randn(rows * kv, groups, d, device="cuda").to(torch.bfloat16)
    k, v = (torch.randn(rows, kv, length, d, device="cuda").to(torch.bfloat16) for _ in range(2))
    sinks = torch.randn(rows * kv, groups, 1, device="cuda").to(torch.bfloat16)
    pos = torch.tensor([0, 5, 127, 128, 300, length - 1], device="cuda")
    k_pos = torch.arange(length, device="cuda")[None]
    causal = k_pos <= pos[:, None]
    for label, layer_window, allowed in (("full", length, causal),
                                         ("sliding", window, causal & (k_pos > pos[:, None] - window))):
        mask = expand_mask(additive_mask(allowed, torch.bfloat16), kv)
        kernel = attend_one(q, k, v, Keys(mask, pos, layer_window, True), sinks, scaling).float()
        plain = attend_one(q, k, v, Keys(mask, pos, layer_window, False), sinks, scaling).float()
        reference = attend_one(q.float(), k.float(), v.float(), Keys(mask.float(), pos, layer_window, False),
                               sinks.float(), scaling)
        kernel_error = (kernel - reference).abs().max().item()
        plain_error = (plain - reference).abs().max().item()
        print(f"\n{label} layer: kernel {kernel_error:.2e}, plain bf16 path {plain_error:.2e} from fp32")
        assert kernel_error <= max(plain_error, 1e-2)
        outside = ~allowed[:, None, :, None].expand(rows, kv, length, d)
        poisoned = [c.masked_fill(outside, float("nan")) for c in (k, v)]
        again = attend_one(q, *poisoned, Keys(mask, pos, layer_window, True), sinks, scaling).float()
        assert torch.equal(again, kernel)


def test_the_decode_router_keeps_the_experts_cuda_topk_keeps_even_on_ties():
    """decode_step.route (counting the experts ahead, the lower index first among equals) selects the same experts
    as torch.topk on the GPU, which the training forward's router runs: on bf16 logits rounded coarsely enough
    that the k-th place is often shared."""
    from gpu_engine.decode_step import route

    torch.manual_seed(0)
    experts, top_k = 32, 4
    h = torch.randn(4096, 64, device="cuda")
    weight = torch.randn(experts, 64, device="cuda")
    h, weight = h.to(torch.bfloat16), weight.to(torch.bfloat16)
    bias = torch.zeros(experts, device="cuda", dtype=torch.bfloat16)
    logits = torch.nn.functional.linear(h, weight, bias)
    coarse = (logits * 2).round() / 2 + 0.0  # many ties (+ 0.0: no negative zeros, which topk ranks apart)
    for values in (logits, coarse):
        _, index = torch.topk(values, top_k, dim=-1)
        expected = torch.zeros(values.shape, dtype=torch.bool, device="cuda").scatter(1, index, True)
        kth = values.sort(dim=-1, descending=True).values[:, top_k - 1:top_k + 1]
        print(f"\nrows whose k-th place is shared: {(kth[:, 0] == kth[:, 1]).float().mean().item():.1%}")
        chosen = route_selection(route, values, top_k)
        assert torch.equal(chosen, expected)


def route_selection(route, logits, top_k):
    """The experts route() keeps for given logits (an identity projection feeds the logits through)."""
    eye = torch.eye(logits.shape[1], device=logits.device, dtype=logits.dtype)
    zero = torch.zeros(logits.shape[1], device=logits.device, dtype=logits.dtype)
    return route(logits, eye, zero, top_k) > 0


def test_the_combine_kernel_reads_only_the_routed_experts_and_sums_as_the_plain_path():
    """mxfp4_experts.combine_experts with its Triton kernel (gpu_engine/combine_experts_kernel.py) at a decode step's 20b shape
    (32 experts, top 4, 32 rows, hidden 2880) against the plain path: the same bf16 products, summed in fp32 in
    another order, so equal but for a last-place rounding in rare values; and NaN in every expert a token was not
    routed to changes nothing (those rows are never read)."""
    from gpu_engine.mxfp4_experts import combine_experts, routing_matrix

    torch.manual_seed(0)
    experts, rows, hidden = 32, 32, 2880
    out = torch.randn(experts, rows, hidden, device="cuda").to(torch.bfloat16)
    top = torch.topk(torch.randn(rows, experts, device="cuda"), 4, dim=-1)
    routing = routing_matrix(top.indices, torch.softmax(top.values, -1).to(torch.bfloat16), experts)
    kernel = combine_experts(out, routing, torch.bfloat16, kernel=True)
    plain = combine_experts(out, routing, torch.bfloat16)
    equal = (kernel == plain).float().mean().item()
    print(f"\ncombine kernel: {equal:.4%} of values equal to the plain path's")
    assert equal > 0.999
    torch.testing.assert_close(kernel, plain, rtol=2 ** -7, atol=0)
    poisoned = out.masked_fill((routing.t() == 0)[:, :, None], float("nan"))
    assert torch.equal(combine_experts(poisoned, routing, torch.bfloat16, kernel=True), kernel)
