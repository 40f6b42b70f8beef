"""sink_attention (gpt-oss attention with sinks through SDPA) against transformers' eager gpt-oss attention, in fp32
on a CPU: logits, every parameter's gradient (the sinks' included), and greedy decoding through the KV cache."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig

from gpu_engine import sink_attention

SLIDING_WINDOW = 4  # shorter than the sequences below, so that the sliding layer's mask matters


@pytest.fixture(scope="module")
def models():
    """One small random gpt-oss twice, the same weights: eager attention and sink_attention.NAME."""
    sink_attention.register()
    config = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96,
                          hidden_size=32, intermediate_size=32, head_dim=16, num_attention_heads=4,
                          num_key_value_heads=2, sliding_window=SLIDING_WINDOW,
                          layer_types=["sliding_attention", "full_attention"],
                          pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    # each model its own config: from_config writes the attention implementation into the config it is given
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager")
    with torch.no_grad():  # weights large enough that attention, and each sink, moves the logits
        for name, param in eager.named_parameters():
            scale = 2.0 if "sinks" in name else 0.3
            param.copy_((1.0 if "norm" in name else 0.0) + torch.randn_like(param) * scale)
    fused = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32,
                                             attn_implementation=sink_attention.NAME, experts_implementation="eager")
    fused.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert fused.config._attn_implementation == sink_attention.NAME
    return eager, fused


def batch():
    """Two sequences, the second left-padded (a GRPO batch pads its prompts on the left)."""
    torch.manual_seed(1)
    ids = torch.randint(2, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def test_logits_and_gradients_equal_eager_attention(models):
    eager, fused = models
    ids, mask = batch()
    results = []
    for model in (eager, fused):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().square().mean()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_logits, eager_grads), (fused_logits, fused_grads) = results
    real = mask.bool()  # padded positions' outputs are never read
    torch.testing.assert_close(fused_logits[real], eager_logits[real], atol=1e-5, rtol=1e-5)
    assert any("sinks" in n for n in fused_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_sinks_matter(models):
    """Guards the test above: with the sinks at zero the logits move, so an implementation that dropped them fails."""
    _, fused = models
    ids, mask = batch()
    with torch.no_grad():
        before = fused(input_ids=ids, attention_mask=mask).logits
        saved = [layer.self_attn.sinks.clone() for layer in fused.model.layers]
        for layer in fused.model.layers:
            layer.self_attn.sinks.zero_()
        after = fused(input_ids=ids, attention_mask=mask).logits
        for layer, sinks in zip(fused.model.layers, saved):
            layer.self_attn.sinks.copy_(sinks)
    assert (before - after).abs().max() > 1e-2


def test_greedy_decoding_through_the_cache_equals_eager(models):
    """Each decode step's scores through the KV cache (one query against the cached keys, both layer kinds), not only
    the greedy tokens, which small errors would not move."""
    eager, fused = models
    ids, mask = batch()
    with torch.no_grad():
        outputs = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, eos_token_id=None, output_scores=True,
                                  return_dict_in_generate=True) for model in (eager, fused)]
    assert outputs[0].sequences.shape[1] == ids.shape[1] + 12
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(torch.stack(outputs[1].scores), torch.stack(outputs[0].scores), atol=1e-5, rtol=1e-5)


def test_registration_stops_with_a_message_naming_a_changed_transformers_internal(monkeypatch):
    import transformers.masking_utils

    import library_internals

    library_internals.check(library_internals.ATTENTION)  # the installed transformers has every one
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", lambda batch_size, q_length, kv_length: None)
    with pytest.raises(library_internals.LibraryMismatch, match="sdpa_mask no longer takes allow_is_causal_skip"):
        sink_attention.register()


def test_a_cpu_keeps_eager_attention_and_a_gpu_takes_the_fused_one():
    assert sink_attention.implementation_for("cpu") == "eager"
    assert sink_attention.implementation_for("cuda") == sink_attention.NAME
    assert sink_attention.implementation_for(torch.device("cuda", 0)) == sink_attention.NAME


def test_without_a_mask_or_with_a_float_one_the_result_is_the_boolean_masks(models):
    """attention_mask None (transformers' early exits): each query sees the keys up to its own place at the end of
    the keys, within the window on a sliding layer, as with the explicit mask, for a prefill and a decode step; an
    additive float mask (0 / dtype minimum) gives what the boolean one gives."""
    _, fused = models
    torch.manual_seed(2)
    for layer in fused.model.layers:  # a sliding layer (window 4), then a full one
        attention = layer.self_attn
        window = attention.sliding_window
        for queries, keys in ((6, 6), (1, 5), (3, 7)):
            q = torch.randn(2, 4, queries, 16)
            k, v = torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16)
            place = torch.arange(queries)[:, None] + keys - queries
            allowed = torch.arange(keys)[None, :] <= place
            if window:
                allowed = allowed & (torch.arange(keys)[None, :] > place - window)
            mask = allowed[None, None].expand(2, 1, -1, -1)
            additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            explicit, _ = sink_attention.sdpa_with_sinks(attention, q, k, v, mask, 0.25, s_aux=attention.sinks)
            implicit, _ = sink_attention.sdpa_with_sinks(attention, q, k, v, None, 0.25, s_aux=attention.sinks,
                                                         sliding_window=window)
            floating, _ = sink_attention.sdpa_with_sinks(attention, q, k, v, additive, 0.25, s_aux=attention.sinks)
            assert explicit.shape == (2, queries, 4, 16)
            torch.testing.assert_close(implicit, explicit)
            torch.testing.assert_close(floating, explicit)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_fused_kernel_runs_and_matches_fp32_better_than_eager_bf16(monkeypatch):
    """The 20b shape's attention (64 query heads, 8 kv heads of 64, GRPO's ~520 tokens, a sliding layer's window of
    128, left padding) in bf16: SDPA must run one of its fused kernels (the math fallback is excluded here, so a
    layout it cannot take fails), and output and input gradients must be at least as close to an fp32 eager
    reference as transformers' eager attention in bf16 is."""
    from torch.nn.attention import SDPBackend
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    class Attention(torch.nn.Module):  # what the attention functions read of a GptOssAttention
        num_key_value_groups = 8
        sinks = None  # each run's own leaf: transformers 5.17's eager attention reads module.sinks, not s_aux

    torch.manual_seed(0)
    module = Attention()
    sinks = torch.randn(64, device="cuda")
    batch, length, window = 4, 520, 128
    q = torch.randn(batch, 64, length, 64, device="cuda")
    k, v = torch.randn(batch, 8, length, 64, device="cuda"), torch.randn(batch, 8, length, 64, device="cuda")
    place = torch.arange(length, device="cuda")
    allowed = (place[None, :] <= place[:, None]) & (place[None, :] > place[:, None] - window)
    padding = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    padding[1, :37] = False
    mask = (allowed[None] & padding[:, None, :])[:, None]
    additive = torch.zeros(mask.shape, device="cuda").masked_fill(~mask, torch.finfo(torch.float32).min)
    grad_out = torch.randn(batch, length, 64, 64, device="cuda")
    real = padding  # padded queries' outputs are never read

    def run(attention, dtype, attention_mask):
        inputs = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, sinks)]
        module.sinks = inputs[3]
        out, _ = attention(module, *inputs[:3], attention_mask, 0.125, s_aux=inputs[3])
        out.backward(grad_out.to(dtype))
        return [out.detach().float()[real]] + [t.grad.float() for t in inputs]

    reference = run(eager_attention_forward, torch.float32, additive)
    eager = run(eager_attention_forward, torch.bfloat16, additive.to(torch.bfloat16))
    monkeypatch.setattr(sink_attention, "BACKENDS", [b for b in sink_attention.BACKENDS if b != SDPBackend.MATH])
    fused = run(sink_attention.sdpa_with_sinks, torch.bfloat16, mask)
    for name, ref, e, f in zip(("output", "grad q", "grad k", "grad v", "grad sinks"), reference, eager, fused):
        eager_error = ((e - ref).norm() / ref.norm()).item()
        fused_error = ((f - ref).norm() / ref.norm()).item()
        print(f"\n{name}: relative error to fp32, eager bf16 {eager_error:.2e}, fused {fused_error:.2e}")
        # the sinks' gradient sums a whole softmax column per head: allowed twice eager's error, not yet measured
        assert fused_error <= (max(2 * eager_error, 1e-2) if name == "grad sinks" else max(eager_error, 4e-3))


def test_a_call_without_sinks_is_refused_by_name():
    q = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match=f"{sink_attention.NAME}: no attention sinks were passed"):
        sink_attention.sdpa_with_sinks(torch.nn.Module(), q, q, q, None, 0.25)


def test_sdpa_runs_without_cudnn_whose_plans_are_rebuilt_for_every_new_shape(monkeypatch):
    # GRPO's shapes change every step; cuDNN would build a plan for each (sink_attention.BACKENDS says why)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    sink_attention.sdpa_with_sinks(torch.nn.Module(), q, k, v, None, 0.25, s_aux=torch.zeros(4))
    assert seen == [(False, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # only while the call runs
