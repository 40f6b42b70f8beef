"""MXFP4-resident experts (gpu_engine/mxfp4_experts.py) on a CPU: the same model as the dequantised load, exactly.

Every MXFP4 value is exact in fp32, so on the tiny stand-in in fp32 the logits, greedy tokens and gradients of the
MXFP4 path must equal the dequantised path's up to the summation order of fp32 matmuls.
"""

import os
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_loader
from gpu_engine import mxfp4
from gpu_engine import mxfp4_experts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return (model_loader.load_model("tiny", experts_format="bf16"),
            model_loader.load_model("tiny", experts_format="mxfp4"))


@pytest.fixture(scope="module")
def tokenizer():
    return model_loader.load_tokenizer("tiny")


def prompt_ids(tokenizer, count=3):
    import pandas as pd

    from lora_fixtures import HARMONY_CSV

    prompts = pd.read_csv(HARMONY_CSV, keep_default_na=False)["prompt"].tolist()[:count]
    ids = tokenizer(text=prompts)["input_ids"]
    return [row[:min(map(len, ids))] for row in ids]  # one length: a batch without padding


def test_the_experts_stay_packed(models):
    _, packed = models
    for layer in packed.model.layers:
        experts = layer.mlp.experts
        assert isinstance(experts, mxfp4_experts.Mxfp4Experts)
        assert experts.gate_up_proj_blocks.dtype == experts.down_proj_blocks.dtype == torch.uint8
        assert experts.gate_up_proj.numel() == experts.down_proj.numel() == 0  # names for PEFT, no weights


def test_logits_equal_the_dequantised_model(models, tokenizer):
    dequantised, packed = models
    ids = torch.tensor(prompt_ids(tokenizer, 2))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, dequantised(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_greedy_tokens_equal_generate_on_the_dequantised_model(models, tokenizer):
    dequantised, packed = models
    ids = torch.tensor(prompt_ids(tokenizer, 1))
    kwargs = dict(do_sample=False, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert packed.generate(ids, **kwargs).tolist() == dequantised.generate(ids, **kwargs).tolist()


def test_the_rollout_engine_samples_the_same_tokens(models, tokenizer):
    from gpu_engine.rollout_engine import RolloutEngine

    rows = [ids for ids in prompt_ids(tokenizer, 2) for _ in range(3)]
    results = []
    for model in models:
        torch.manual_seed(5)
        results.append(RolloutEngine(model, tokenizer).generate(rows, 32))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(torch.tensor(sum(results[0][1], [])), torch.tensor(sum(results[1][1], [])),
                               atol=1e-5, rtol=0)


def live_adapter(model, experts=True, seed=0):
    """`model` with a LoRA on attention (and the experts) whose B factors are not zero, so that it changes the
    output and gradients reach every factor."""
    from peft import LoraConfig, get_peft_model

    from gpu_engine import expert_lora

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                        target_parameters=expert_lora.EXPERT_TARGETS if experts else None)
    wrapped = get_peft_model(model, expert_lora.register(config))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return wrapped


def test_input_and_lora_gradients_equal_autograd_through_dequantised_weights(models, tokenizer):
    """Attention and expert LoRA: on MXFP4 experts the expert LoRA runs as low-rank terms beside the packed
    weights, on the dequantised ones as PEFT's own W + BA; the gradients must agree."""
    ids = torch.tensor(prompt_ids(tokenizer, 2))
    grads = []
    for model in models:
        wrapped = live_adapter(model)
        embeds = wrapped.get_input_embeddings()(ids).detach().requires_grad_()
        logits = wrapped(inputs_embeds=embeds).logits
        torch.log_softmax(logits, -1)[..., :7].mean().backward()  # gradients of order 1: atol means something
        grads.append({"input": embeds.grad} | {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad})
        wrapped.unload()  # the module-scoped models go back without their adapter
    assert grads[0].keys() == grads[1].keys() and any("experts.base_layer.lora_A" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_each_tokens_rows_gradient_is_one_fp32_sum_rounded_once():
    """GatheredRows (the grouped path's token rows, sorted by expert): the same rows as index_select, and a token's
    gradient the sum of its top_k rows' gradients in fp32, rounded once to bf16, where a scatter in bf16 would round
    after every add; as a plain permutation (the way back to token order) its gradient is the permuted gradient."""
    torch.manual_seed(0)
    tokens, top_k, width = 5, 4, 8
    flat = torch.randint(0, 3, (tokens * top_k,))
    order = torch.argsort(flat, stable=True)
    hidden = torch.randn(tokens, width).to(torch.bfloat16).requires_grad_()
    rows = mxfp4_experts.GatheredRows.apply(hidden, order, torch.argsort(order), top_k)
    assert torch.equal(rows, hidden.index_select(0, order // top_k))
    # each token's rows: 1 first, then three values below half of bf16's step at 1, which a sum rounded after every
    # add would lose one by one (1 + 2^-9 rounds to 1), and one fp32 sum keeps (1 + 3 * 2^-9 rounds to 1 + 2^-7)
    grad_rows = torch.full((tokens * top_k, width), 2.0**-9)
    for token in range(tokens):
        grad_rows[(order // top_k == token).nonzero()[0]] = 1.0
    rows.backward(grad_rows.to(torch.bfloat16))
    assert torch.equal(hidden.grad, torch.full((tokens, width), 1 + 2.0**-7, dtype=torch.bfloat16))
    sorted_rows = torch.randn(tokens * top_k, width, requires_grad=True)
    unsorted = mxfp4_experts.GatheredRows.apply(sorted_rows, torch.argsort(order), order, 1)
    assert torch.equal(unsorted, sorted_rows[torch.argsort(order)])
    grad = torch.randn(tokens * top_k, width)
    unsorted.backward(grad)
    assert torch.equal(sorted_rows.grad[torch.argsort(order)], grad)


def test_an_expert_lora_is_one_file_for_both_formats(models, tokenizer, tmp_path):
    """Saved from MXFP4 experts, the adapter holds PEFT's names and shapes and gives the same logits on either
    format; it runs as low-rank terms (a merge into the packed bytes is refused) and the engine samples with it."""
    from peft import PeftModel

    from gpu_engine import expert_lora
    from gpu_engine.rollout_engine import RolloutEngine

    dequantised, packed = models
    ids = torch.tensor(prompt_ids(tokenizer, 2))
    wrapped = live_adapter(packed, seed=3)
    wrapped.save_pretrained(str(tmp_path / "from-mxfp4"))
    wrapped.unload()
    reference = live_adapter(dequantised, seed=3)
    reference.save_pretrained(str(tmp_path / "from-bf16"))
    reference.unload()
    header = {name: entry["shape"] for name, entry in mxfp4.read_safetensors_header(
        str(tmp_path / "from-mxfp4" / "adapter_model.safetensors")).items()}
    assert header == {name: entry["shape"] for name, entry in mxfp4.read_safetensors_header(
        str(tmp_path / "from-bf16" / "adapter_model.safetensors")).items()}
    assert any(".mlp.experts.base_layer.lora_B" in name for name in header)

    on_bf16 = PeftModel.from_pretrained(dequantised, str(tmp_path / "from-mxfp4"))  # PEFT's own wrapper
    on_mxfp4 = expert_lora.load_adapter(packed, tmp_path / "from-mxfp4")
    rows = [row for row in prompt_ids(tokenizer, 2) for _ in range(2)]
    results = []
    try:
        with torch.no_grad():
            adapted = on_mxfp4(input_ids=ids).logits
            torch.testing.assert_close(adapted, on_bf16(input_ids=ids).logits, atol=1e-5, rtol=0)
            with on_mxfp4.disable_adapter():  # the reference model TRL asks for under BETA > 0
                assert (on_mxfp4(input_ids=ids).logits - adapted).abs().max() > 1e-2
        with pytest.raises(ValueError, match="cannot be merged into MXFP4-resident experts"):
            on_mxfp4.merge_adapter()
        with warnings.catch_warnings():  # PEFT says "Already unmerged" of the layers it never got to merge
            warnings.filterwarnings("ignore", message="Already unmerged")
            on_mxfp4.unmerge_adapter()  # what the message says undoes the layers PEFT merged before the experts
        assert not any(getattr(m, "merged", False) for m in on_mxfp4.modules())
        with torch.no_grad():
            torch.testing.assert_close(on_mxfp4(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
        for model in (on_bf16, on_mxfp4):
            torch.manual_seed(5)
            results.append(RolloutEngine(model, tokenizer).generate(rows, 24))
    finally:
        on_bf16.unload()
        on_mxfp4.unload()
    assert results[0][0] == results[1][0]


def test_backward_saves_only_the_packed_bytes():
    torch.manual_seed(0)
    weight = torch.randn(3, 64, 96) * 0.1
    blocks, scales = mxfp4.quantize_mxfp4(weight)
    counts = torch.tensor([2, 0, 3])
    expert_of_row = torch.repeat_interleave(torch.arange(3), counts)
    bias = torch.randn(3, 64)
    x = torch.randn(5, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mxfp4_experts.Mxfp4GroupedMatmul.apply(x, counts, blocks, scales, bias, expert_of_row)
    assert saved and all(not t.is_floating_point() for t in saved)  # no dequantised copy, no activation
    grad = torch.randn_like(out)
    out.backward(grad)
    dequantised = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)  # [E, out, in]
    expected = torch.bmm(x.detach()[:, None], dequantised[expert_of_row].transpose(1, 2))[:, 0] + bias[expert_of_row]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, torch.bmm(grad[:, None], dequantised[expert_of_row])[:, 0])
    with pytest.raises(ValueError, match="biases are frozen"):
        mxfp4_experts.Mxfp4GroupedMatmul.apply(x, counts, blocks, scales, bias.requires_grad_(), expert_of_row)


def test_expert_counts_equal_bincount():
    flat = torch.tensor([3, 0, 3, 7, 7, 7, 1])
    assert torch.equal(mxfp4_experts.expert_counts(flat, 9), torch.bincount(flat, minlength=9))
    assert torch.equal(mxfp4_experts.expert_counts(flat[:0], 4), torch.zeros(4, dtype=torch.long))


def test_the_grouped_matmul_choice_is_named_or_refused(monkeypatch):
    assert mxfp4_experts.grouped_matmul_kind() == mxfp4_experts.GROUPED_MATMUL
    monkeypatch.setenv(mxfp4_experts.GROUPED_MATMUL_VARIABLE, "fused")
    assert mxfp4_experts.grouped_matmul_kind() == "fused"
    monkeypatch.setenv(mxfp4_experts.GROUPED_MATMUL_VARIABLE, "fast")
    with pytest.raises(ValueError, match="GPT_OSS_GROUPED_MATMUL='fast'.*'fused' or 'dequantize'"):
        mxfp4_experts.grouped_matmul_kind()


def test_nibble_order_and_scale_bias_are_the_checkpoints():
    """One hand-written block: byte 0x71 holds code 1 (0.5) in its low nibble, the even input, and code 7 (6.0) in
    its high nibble, the odd one; byte 0xA0 holds 0 and code 10 (-1.0); scale byte 128 means 2^(128 - 127) = 2."""
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0], blocks[..., 1] = 0x71, 0xA0
    scales = torch.full((1, 1, 1), 128, dtype=torch.uint8)
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # reads each input's value off the sum
    out = mxfp4_experts.dense_matmul(x, blocks, scales, torch.zeros(1, 1))
    assert out.item() == 2 * (0.5 * 1 + 6.0 * 10 + 0.0 * 100 - 1.0 * 1000)


def test_the_decode_operator_refuses_inputs_not_laid_out_for_its_kernel():
    """The operator takes its input already laid out (mxfp4_experts.kernel_input): bf16 rows handed to a kernel that
    reads fp16, or more rows than 'transposed' holds, are refused with a message naming the helper to call, before
    any kernel runs (so this runs on a CPU)."""
    blocks = torch.zeros(2, 8, 2, 16, dtype=torch.uint8)
    scales = torch.full((2, 8, 2), 127, dtype=torch.uint8)
    bias = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kernel_input"):
        mxfp4_experts.launch_dense(torch.zeros(4, 64, dtype=torch.bfloat16), blocks, scales, bias, "transposed")
    with pytest.raises(ValueError, match="kernel_input"):
        mxfp4_experts.launch_dense(torch.zeros(4, 64, dtype=torch.bfloat16), blocks, scales, bias, "blocked")
    rows = mxfp4_experts.TRANSPOSED_MAX_ROWS + 1
    with pytest.raises(ValueError, match="kernel_for_rows"):
        mxfp4_experts.launch_dense(torch.zeros(rows, 64, dtype=torch.float16), blocks, scales, bias, "transposed")
    assert mxfp4_experts.kernel_for_rows("transposed", rows) == "blocked"
    with pytest.raises(ValueError, match="scales_for_transposed"):  # the checkpoint's [E, out, in / 32] scales
        mxfp4_experts.launch_dense(torch.zeros(4, 64, dtype=torch.float16), blocks, scales, bias, "transposed")
    with pytest.raises(ValueError, match="only the 'transposed' kernel computes the SwiGLU"):
        mxfp4_experts.launch_dense(torch.zeros(4, 64, dtype=torch.float16), blocks, scales, bias, "blocked",
                                   swiglu=(7.0, 1.702))
    with pytest.raises(ValueError, match="offsets"):  # each expert's routed rows: the 'transposed' kernel's
        mxfp4_experts.launch_dense(torch.zeros(4, 64, dtype=torch.float16), blocks, scales, bias, "blocked",
                                   offsets=torch.tensor([0, 2, 4], dtype=torch.int32))


def random_experts(experts=8, hidden=64, inter=64, seed=0):
    """An Mxfp4Experts of random packed weights and biases (fp32 biases: the reference path computes in fp32)."""
    torch.manual_seed(seed)
    module = mxfp4_experts.Mxfp4Experts(experts, hidden, inter, limit=7.0, alpha=1.702, dtype=torch.float32)
    for (blocks, scales), shape in zip(module.matrices(), ((experts, 2 * inter, hidden), (experts, hidden, inter))):
        packed, packed_scales = mxfp4.quantize_mxfp4(torch.randn(shape) * 0.1)
        blocks.copy_(packed.reshape(blocks.shape))
        scales.copy_(packed_scales)
    module.gate_up_proj_bias.data.normal_(0, 0.1)
    module.down_proj_bias.data.normal_(0, 0.1)
    return module


def test_routed_experts_multiply_each_expert_by_its_own_tokens_as_the_dense_path_does():
    """A routed decode step (each expert given only the rows routed to it, grouped by expert) gives the dense path's
    result, and its bookkeeping is what the 'transposed' kernel and the combine rely on: expert e's tokens, in
    order, in rows offsets[e] .. offsets[e + 1]; rows[t, e] the row of a routed pair; a routing weight of 0 means
    not routed."""
    experts = random_experts()
    tokens, top_k = 20, 2
    h = torch.randn(tokens, 64)
    top = torch.topk(torch.randn(tokens, 8), top_k, dim=-1)
    routing = mxfp4_experts.routing_matrix(top.indices, torch.softmax(top.values, -1), 8)
    token_of, rows, offsets = mxfp4_experts.routed_rows(routing, tokens * top_k)
    routed = routing != 0
    assert offsets.tolist() == [0] + routed.sum(0).cumsum(0).tolist() and offsets[-1] == tokens * top_k
    for e in range(8):  # each expert's tokens in order, in its own rows
        assert token_of[offsets[e]:offsets[e + 1]].tolist() == routed[:, e].nonzero()[:, 0].tolist()
    for t, e in routed.nonzero().tolist():
        assert token_of[rows[t, e]] == t and offsets[e] <= rows[t, e] < offsets[e + 1]
    tensors = mxfp4_experts.dense_tensors(experts, cuda=False)
    dense = mxfp4_experts.dense_experts(h, routing, tensors)
    routed_out = mxfp4_experts.routed_experts(h, routing, tensors, top_k)
    torch.testing.assert_close(routed_out, dense, atol=1e-5, rtol=1e-5)
    # a token routed to one expert only (the other weight 0, as an underflowed softmax would give) leaves that
    # expert out of the sum in both paths, and one row unused
    routing[0, top.indices[0, 1]] = 0
    torch.testing.assert_close(mxfp4_experts.routed_experts(h, routing, tensors, top_k),
                               mxfp4_experts.dense_experts(h, routing, tensors), atol=1e-5, rtol=1e-5)


def test_the_combine_reads_each_pairs_row_and_never_an_unused_one():
    """combine_experts with rows (the routed layout): out[rows[t, e]] is token t's output of expert e; rows no pair
    uses hold whatever the kernel left there (NaN here) and change nothing."""
    torch.manual_seed(1)
    experts, tokens, hidden = 4, 6, 16
    top = torch.topk(torch.randn(tokens, experts), 2, dim=-1)
    routing = mxfp4_experts.routing_matrix(top.indices, torch.softmax(top.values, -1), experts)
    routing[0, top.indices[0, 1]] = 0  # one pair fewer: one unused row
    token_of, rows, offsets = mxfp4_experts.routed_rows(routing, tokens * 2)
    per_token = torch.randn(experts, tokens, hidden)  # expert e's output for token t, in token order
    routed_layout = torch.full((tokens * 2, hidden), float("nan"))
    for e in range(experts):
        routed_layout[offsets[e]:offsets[e + 1]] = per_token[e, token_of[offsets[e]:offsets[e + 1]]]
    expected = mxfp4_experts.combine_experts(per_token, routing, torch.float32)
    torch.testing.assert_close(mxfp4_experts.combine_experts(routed_layout, routing, torch.float32, rows=rows),
                               expected)


def test_the_kept_copy_of_the_scales_follows_new_scales():
    """Mxfp4Experts.kernel_scales keeps the 'transposed' kernel's copy of the scales between decode steps, and makes
    it again when the scales are written in place (a checkpoint loaded into the module) or replaced."""
    experts = mxfp4_experts.Mxfp4Experts(2, 64, 64, limit=7.0, alpha=1.702)
    for _, scales in experts.matrices():
        scales.copy_(torch.randint(110, 120, scales.shape, dtype=torch.uint8))
    experts.decode_kernel = "transposed"  # what choose_dense_kernel picks on Hopper
    first = experts.kernel_scales()
    assert experts.kernel_scales()[0] is first[0]  # kept, not made again
    experts.gate_up_proj_scales.fill_(121)
    assert (experts.kernel_scales()[0][:, :, :128] == 121).all()
    experts.down_proj_scales = torch.full_like(experts.down_proj_scales, 99)
    assert (experts.kernel_scales()[1][:, :, :64] == 99).all()
    experts.decode_kernel = "blocked"
    assert experts.kernel_scales() == (None, None)


def test_scales_for_transposed_puts_each_block_of_inputs_in_one_padded_row():
    """The 'transposed' kernel's scale layout: [E, in / 32, out rounded up to 16], entry [e, g, n] the scale of output
    n's block g, zeros in the padding (TMA's shape stops before it)."""
    scales = torch.randint(0, 256, (3, 20, 5), dtype=torch.uint8)
    laid_out = mxfp4_experts.scales_for_transposed(scales)
    assert laid_out.shape == (3, 5, 32) and laid_out.is_contiguous()
    for e, n, g in ((0, 0, 0), (1, 19, 4), (2, 7, 2)):
        assert laid_out[e, g, n] == scales[e, n, g]
    assert not laid_out[:, :, 20:].any()


def fp16_of_bits(bits):
    """int32 tensor of 16-bit patterns -> the fp16 values they encode."""
    return ((bits + 0x8000) % 0x10000 - 0x8000).to(torch.int16).view(torch.float16)


def e4m3_to_float(bits):
    """int32 tensor of e4m3 byte patterns -> their values (float32): sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    exponent, mantissa = (bits >> 3) & 15, (bits & 7).float()
    magnitude = torch.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.where((bits & 0x80) != 0, -magnitude, magnitude)


def transposed_weights(blocks, scales):
    """What mxfp4_kernels.transposed_matmul_kernel builds of a weight, in torch: codes as e4m3 bytes by bit moves
    (value x 2^-6), converted to fp16, times the fp16 factor 2^(byte - 113), (low, high) nibbles joined, then bytes
    4c + 2j + i of each block reordered to the permuted input order 16h + 8j + 2c + i. Returns fp16 [E, out, in] in
    that order: the weights times 2^8 (the kernel scales its sums by 2^-8)."""
    codes = blocks.to(torch.int32)
    low = e4m3_to_float(((codes << 4) & 0x80) | ((codes << 2) & 0x1C)).half()
    high = e4m3_to_float((codes & 0x80) | ((codes >> 2) & 0x1C)).half()
    factor = fp16_of_bits((scales.to(torch.int32) - 98) << 10)
    w = torch.stack([low, high], -1) * factor[..., None, None]  # fp16 products, as on the GPU
    e, n, groups = scales.shape
    # byte 4c + 2j + i, nibble h -> position 16h + 8j + 2c + i, as the kernel's permute and reshape order them
    return w.reshape(e, n, groups, 4, 2, 2, 2).permute(0, 1, 2, 6, 4, 3, 5).reshape(e, n, groups * 32)


def test_transposed_kernel_layout_multiplies_the_permuted_inputs_exactly():
    """The 'transposed' kernel's index and bit math (emulated in torch): for every scale byte in its range the fp16
    weights equal the checkpoint's values, in the order permute_for_transposed gives the inputs; one byte outside
    the range either side is not exact, so the range is as wide as it may be and no wider."""
    torch.manual_seed(0)
    low, high = mxfp4_experts.TRANSPOSED_SCALE_BYTES
    blocks = torch.randint(0, 256, (2, high - low + 1, 3, 16), dtype=torch.uint8)
    scales = torch.arange(low, high + 1, dtype=torch.uint8)[None, :, None].expand(2, -1, 3).contiguous()
    exact = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
    w = transposed_weights(blocks, scales).float() / 256
    assert torch.equal(w, mxfp4_experts.permute_for_transposed(exact))
    x = torch.randn(5, 96)
    torch.testing.assert_close(mxfp4_experts.permute_for_transposed(x) @ w.transpose(1, 2),
                               x @ exact.transpose(1, 2), atol=1e-5, rtol=1e-5)
    every_code = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for outside in (low - 1, high + 1):
        scale = torch.full((1, 1, 16), outside, dtype=torch.uint8)
        assert not torch.equal(transposed_weights(every_code, scale).float() / 256,
                               mxfp4_experts.permute_for_transposed(mxfp4.dequantize_mxfp4(every_code, scale,
                                                                                           torch.float32)))


def fp16_bits_of_e4m3(byte):
    """The fp16 bit pattern of an e4m3 byte's value (what cvt.rn.f16x2.e4m3x2 writes per half: exact)."""
    return int(fp16_float_bits(e4m3_to_float(torch.tensor([byte])).item()))


def fp16_float_bits(value):
    return torch.tensor([value], dtype=torch.float16).view(torch.int16).item() & 0xFFFF


def run_ptx(asm, inputs):
    """The few PTX instructions of an inline-asm block (prmt, shl, shr, and, or on .b32; mov of a .b32 into two
    .b16 halves; cvt.rn.f16x2.e4m3x2), run on ints: enough to check the kernels' bit moves on a CPU. inputs:
    {"$4": int}; returns the registers."""
    regs = dict(inputs)

    def value(operand):
        return regs[operand] if operand in regs else int(operand, 0)

    for line in asm.split(";"):
        parts = [p for p in line.replace(",", " ").split() if p not in ("{", "}")]
        if not parts or parts[0].startswith(".reg"):
            continue
        if parts[0] == "mov.b32":  # mov.b32 {lo, hi}, word
            low_half, high_half, word = parts[1].strip("{"), parts[2].strip("}"), value(parts[3])
            regs[low_half], regs[high_half] = word & 0xFFFF, word >> 16
            continue
        op, dest, *args = parts
        if op == "cvt.rn.f16x2.e4m3x2":  # the low byte to the low half, the high byte to the high half
            pair = value(args[0])
            regs[dest] = fp16_bits_of_e4m3(pair & 0xFF) | (fp16_bits_of_e4m3(pair >> 8) << 16)
            continue
        a, b = value(args[0]), value(args[1])
        if op == "prmt.b32":
            pool, selector, out = a | (b << 32), value(args[2]), 0
            for i in range(4):
                nibble = (selector >> 4 * i) & 15
                byte = (pool >> 8 * (nibble & 7)) & 255
                out |= ((0xFF if byte & 0x80 else 0) if nibble & 8 else byte) << 8 * i
            regs[dest] = out
        else:
            regs[dest] = {"shl.b32": lambda: a << b, "shr.b32": lambda: a >> b, "and.b32": lambda: a & b,
                          "or.b32": lambda: a | b}[op]() & 0xFFFFFFFF
    return regs


def test_transposed_kernel_ptx_turns_every_byte_into_its_two_codes():
    """The inline PTX of mxfp4_kernels.fp16_codes_of_bytes, read from the source and run on every byte value in each
    of the four positions, the other three bytes random: the low outputs ($0, $1: bytes 0-1, 2-3, two fp16 each)
    hold the low nibbles' codes, the high outputs ($2, $3) the high ones, each as value x 2^-6 (triton packs
    element j of four into byte j)."""
    import re

    source = (ROOT / "gpu_engine" / "mxfp4_kernels.py").read_text()
    body = source[source.index("def fp16_codes_of_bytes"):]
    asm = re.search(r'asm="""(.*?)"""', body, re.S).group(1)
    e2m1 = torch.tensor(mxfp4.E2M1_VALUES, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for byte in range(256):
        for position in range(4):
            others = torch.randint(0, 256, (4,), generator=generator).tolist()
            word = sum((byte if j == position else others[j]) << 8 * j for j in range(4))
            regs = run_ptx(asm, {"$4": word})
            for nibble, first in ((byte & 15, "$0"), (byte >> 4, "$2")):
                register = regs[f"${int(first[1]) + position // 2}"]
                half = (register >> 16 * (position % 2)) & 0xFFFF
                got = fp16_of_bits(torch.tensor([half])).float().item()
                assert got == e2m1[nibble].item() * 2.0 ** -6, (byte, position, nibble)


@pytest.mark.skipif(not any((Path(p) / "triton").is_dir() for p in sys.path if p), reason="triton not installed")
def test_triton_kernels_in_the_interpreter_match_the_reference():
    """The Triton kernels themselves, run by Triton's CPU interpreter in fp32 (bf16 is not emulated there)."""
    script = """
import torch
from gpu_engine import mxfp4, mxfp4_kernels
torch.manual_seed(0)
weight = torch.randn(3, 96, 256) * 0.05
blocks, scales = mxfp4.quantize_mxfp4(weight)
ref = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
out = torch.empty_like(ref)
mxfp4_kernels.dequantize_kernel[(36,)](blocks, scales, out, scales.numel(), BLOCKS=64)
assert torch.equal(out, ref)
weight = torch.randn(3, 96, 288) * 0.05  # 288 inputs: not a multiple of any tile's width
blocks, scales = mxfp4.quantize_mxfp4(weight)
ref = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
x, bias = torch.randn(3, 5, 288), torch.randn(3, 96)
kernel = mxfp4_kernels.dense_matmul_kernel.fn  # one tile shape, not the autotuner's timing runs
for tile_n, tile_k in ((64, 128), (32, 256)):
    y = torch.full((3, 5, 96), float("nan"))
    grid = (-(-96 // tile_n), 3, 1)
    kernel[grid](x, blocks, scales, bias, y, 5, 96, x.stride(0), x.stride(1), K=288, BLOCK_M=16, BLOCK_N=tile_n,
                 BLOCK_K=tile_k)
    torch.testing.assert_close(y, torch.bmm(x, ref.transpose(1, 2)) + bias[:, None], atol=1e-4, rtol=1e-4)
# the blocked kernel: fp16 inputs, even and odd ones in two halves
halves = x.reshape(3, 5, 144, 2).transpose(-1, -2).contiguous().to(torch.float16)
for tile_n, unroll in ((64, 2), (32, 4)):
    y = torch.full((3, 5, 96), float("nan"))
    mxfp4_kernels.blocked_matmul_kernel.fn[(-(-96 // tile_n), 3, 1)](
        halves, blocks, scales, bias, y, 5, 96, halves.stride(0), halves.stride(-3), K=288, BLOCK_M=16,
        BLOCK_N=tile_n, UNROLL=unroll)
    expected = torch.bmm(x.half().float(), ref.transpose(1, 2)) + bias[:, None]
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
# the fused grouped matmul: rows grouped by expert (one expert with none, one with more than a row tile), each
# row multiplied by its own expert's weight, forward with its bias and transposed (the backward's input gradient)
counts = torch.tensor([5, 0, 19])
offsets = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
expert = torch.repeat_interleave(torch.arange(3), counts)
kernel = mxfp4_kernels.grouped_matmul_kernel.fn
for transpose, width in ((False, 288), (True, 96)):
    rows = torch.randn(24, width)
    for tile_m, tile_n, tile_k in ((16, 64, 64), (8, 32, 128)):
        n = 96 if not transpose else 288
        y = torch.full((24, n), float("nan"))
        grid = (-(-n // tile_n), -(-24 // tile_m) + 3)
        kernel[grid](rows, blocks, scales, bias, offsets, y, 8, N=n, K=width, EXPERTS=3, EXPERTS_PADDED=4,
                     TRANSPOSE=transpose, HAS_BIAS=not transpose, BLOCK_M=tile_m, BLOCK_N=tile_n, BLOCK_K=tile_k)
        weight = ref[expert] if transpose else ref[expert].transpose(1, 2)
        expected = torch.bmm(rows[:, None], weight)[:, 0] + (0 if transpose else bias[expert])
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
# ... and its dequantisation exact for every code under scale bytes from 1 to 250 (6 x 2^123: 251 and up overflow
# float32 at code 7), byte 0 a block of zeros as in the other kernels: one-hot rows read the weights back
codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # every byte: every pair of codes
scale_bytes = torch.tensor([0, 1, 2, 100, 127, 128, 200, 250], dtype=torch.uint8)
blocks_all = codes[None, :, None, :].expand(len(scale_bytes), 16, 1, 16).reshape(1, 128, 1, 16).contiguous()
scales_all = scale_bytes[:, None].expand(-1, 16).reshape(1, 128, 1).contiguous()
exact = mxfp4.dequantize_mxfp4(blocks_all, scales_all, torch.float32)[0]  # [128, 32]
exact[:16] = 0  # scale byte 0
y = torch.full((32, 128), float("nan"))
kernel[(2, 2)](torch.eye(32), blocks_all, scales_all, y, torch.tensor([0, 32], dtype=torch.int32), y, 32, N=128, K=32,
               EXPERTS=1, EXPERTS_PADDED=1, TRANSPOSE=False, HAS_BIAS=False, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)
assert torch.equal(y, exact.t()), (y - exact.t()).abs().max()
# the SwiGLU kernels (fp32 here: no rounding between steps) against eager swiglu and its autograd, values on both
# sides of the clamps included
from gpu_engine import mxfp4_experts, swiglu_kernel
gate_up = (torch.randn(37, 2 * 29) * 6).requires_grad_()  # 37 x 29 activations: not a multiple of the block
limit, alpha = 7.0, 1.702
expected = mxfp4_experts.swiglu(gate_up, limit, alpha)
grad = torch.randn_like(expected)
expected.backward(grad)
out = torch.full_like(expected, float("nan")).detach()
swiglu_kernel.swiglu_forward_kernel[(2,)](gate_up.detach(), out, out.numel(), limit, alpha, BLOCK=1024)
torch.testing.assert_close(out, expected.detach())
grad_in = torch.full_like(gate_up, float("nan")).detach()
swiglu_kernel.swiglu_backward_kernel[(2,)](gate_up.detach(), grad, grad_in, out.numel(), limit, alpha, BLOCK=1024)
torch.testing.assert_close(grad_in, gate_up.grad)
assert (gate_up.detach().abs() > limit).any() and (grad_in == 0).any()  # clamped values, whose gradient stops
# the combine kernel, in token order and in the routed layout (rows), unrouted rows NaN
from gpu_engine import combine_experts_kernel, mxfp4_experts
top = torch.topk(torch.randn(6, 5), 2, dim=-1)  # 5 experts: not a power of two
routing = mxfp4_experts.routing_matrix(top.indices, torch.softmax(top.values, -1), 5)
token_of, rows, offsets = mxfp4_experts.routed_rows(routing, 12)
per_token = torch.randn(5, 6, 300).masked_fill((routing.t() == 0)[:, :, None], float("nan"))
routed_layout = torch.stack([per_token[e, token_of[r]] for e in range(5) for r in range(offsets[e], offsets[e + 1])])
expected = mxfp4_experts.combine_experts(per_token.nan_to_num(), routing, torch.float32)
for out, with_rows in ((per_token, False), (routed_layout, True)):
    result = torch.full((6, 300), float("nan"))
    combine_experts_kernel.combine_experts_kernel[(2, 6)](out, routing, rows, result, 6, 300, EXPERTS=5,
                                                          EXPERTS_PADDED=8, BLOCK=256, ROWS=with_rows)
    torch.testing.assert_close(result, expected)
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_checkpoint_without_mxfp4_experts_is_refused(models, tmp_path):
    dequantised, _ = models
    dequantised.save_pretrained(tmp_path)  # plain weights, no quantization_config
    with pytest.raises(model_loader.ModelLoadError, match="not stored in MXFP4.*--experts-format bf16"):
        model_loader.load_model(str(tmp_path), experts_format="mxfp4")


def test_an_unknown_experts_format_is_refused():
    with pytest.raises(model_loader.ModelLoadError, match="not one of auto, bf16, mxfp4"):
        model_loader.load_model("tiny", experts_format="fp8")


def test_auto_keeps_mxfp4_experts_on_a_gpu_and_dequantises_them_on_a_cpu(models, monkeypatch):
    """'auto' (every script's default) is 'mxfp4' only where its kernels run: a CUDA device, an MXFP4 checkpoint and
    Triton installed; a name asked for is kept; a loaded model says which format it holds."""
    import importlib.util

    choose = model_loader.choose_experts_format
    assert choose("auto", "cpu", quantized=True) == "bf16"
    assert choose("auto", "cuda", quantized=False) == "bf16"  # plain experts (a bf16 export) stay plain
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else
                        real_find_spec(name, *a))
    assert choose("auto", "cuda", quantized=True) == choose("auto", "cuda:1", quantized=True) == "mxfp4"
    assert choose("bf16", "cuda", quantized=True) == "bf16" and choose("mxfp4", "cpu", quantized=True) == "mxfp4"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        real_find_spec(name, *a))
    assert choose("auto", "cuda", quantized=True) == "bf16"
    dequantised, packed = models
    assert model_loader.experts_format_of(dequantised) == "bf16"
    assert model_loader.experts_format_of(packed) == "mxfp4"
    monkeypatch.undo()
    assert model_loader.experts_format_of(model_loader.load_model("tiny")) == "bf16"  # auto on this CPU


def test_each_process_reads_the_checkpoint_onto_its_own_gpu(monkeypatch):
    """safetensors takes a bare 'cuda' for GPU 0: the MXFP4 loader names the process's current GPU (accelerate sets
    it per process), so the second process of a two-GPU run stages no tensor on the first card."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert model_loader.indexed_device("cuda") == "cuda:1"
    assert model_loader.indexed_device("cuda:0") == "cuda:0" and model_loader.indexed_device("cpu") == "cpu"


def test_a_card_too_small_is_told_what_fits(monkeypatch):
    """A 24 GB card's user loading the 20b shape in bf16 hears, before anything loads, that MXFP4 fits."""
    from transformers import GptOssConfig

    from tiny_gpt_oss import GPT_OSS_20B

    config = GptOssConfig(**GPT_OSS_20B)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_loader, "usable_gpu_bytes", lambda: 23 * 2**30)
    with pytest.raises(model_loader.ModelLoadError) as error:
        model_loader.check_gpu_memory("gpt-oss-20b", config, "bf16", 7.0)
    message = str(error.value)
    assert "--experts-format bf16" in message and "23.0 GiB usable" in message
    assert "--experts-format mxfp4 needs ~" in message and "fits" in message
    model_loader.check_gpu_memory("gpt-oss-20b", config, "mxfp4", 7.0)  # no error
    monkeypatch.setattr(model_loader, "usable_gpu_bytes", lambda: 12 * 2**30)
    with pytest.raises(model_loader.ModelLoadError, match="even --experts-format mxfp4 needs"):
        model_loader.check_gpu_memory("gpt-oss-20b", config, "mxfp4", 7.0)


def test_weight_bytes_of_the_20b_shape():
    from transformers import GptOssConfig

    from tiny_gpt_oss import GPT_OSS_20B

    config = GptOssConfig(**GPT_OSS_20B)
    assert 38.5e9 < model_loader.weight_bytes(config, "bf16") < 42.5e9  # 20.9 B parameters in bf16
    assert 12.5e9 < model_loader.weight_bytes(config, "mxfp4") < 14.5e9  # 10.2 GB of experts + 3.6 GB of the rest


def test_running_out_of_memory_while_loading_gets_the_same_message(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.96 GiB")

    monkeypatch.setattr(model_loader, "check_gpu_memory", lambda *args: None)  # the estimate said it fits
    monkeypatch.setattr(model_loader, "check_gpu_generation", lambda *args: None)  # a card new enough
    monkeypatch.setattr(model_loader, "load_mxfp4_resident", out_of_memory)
    monkeypatch.setattr(model_loader, "usable_gpu_bytes", lambda: 10 * 2**30)
    with pytest.raises(model_loader.ModelLoadError, match=r"needs ~\d+ GiB of GPU memory .* 10.0 GiB usable"):
        model_loader.load_model("tiny", device="cuda", experts_format="mxfp4")


def test_two_active_expert_adapters_are_refused_not_half_run(models, tokenizer):
    """PEFT adds up two active adapters on bf16 experts; the low-rank path runs one and says so."""
    from peft import LoraConfig

    from gpu_engine import expert_lora

    _, packed = models
    wrapped = live_adapter(packed)
    try:
        wrapped.add_adapter("second", expert_lora.register(LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
            target_parameters=expert_lora.EXPERT_TARGETS)))
        wrapped.base_model.set_adapter(["default", "second"])
        with torch.no_grad(), pytest.raises(NotImplementedError, match="two active adapters"):
            wrapped(input_ids=torch.tensor(prompt_ids(tokenizer, 1)))
    finally:
        wrapped.unload()

def test_the_transposed_kernel_is_chosen_on_hopper_alone(monkeypatch):
    import torch

    from gpu_engine import mxfp4_experts

    scales = torch.full((2, 4, 3), 120, dtype=torch.uint8)
    for capability, kernel in (((8, 0), "blocked"), ((8, 6), "blocked"), ((8, 9), "blocked"), ((9, 0), "transposed"),
                               ((12, 0), "blocked")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert mxfp4_experts.choose_dense_kernel(scales) == kernel, capability


def test_a_capability_in_the_environment_makes_a_card_take_an_older_cards_paths(monkeypatch):
    from gpu_engine import mxfp4_experts

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert mxfp4_experts.gpu_capability() == (9, 0) and mxfp4_experts.grouped_mm_fused("cuda")
    monkeypatch.setenv(mxfp4_experts.GPU_CAPABILITY_VARIABLE, "8.6")
    assert mxfp4_experts.gpu_capability() == (8, 6) and not mxfp4_experts.grouped_mm_fused("cuda")
    assert mxfp4_experts.choose_dense_kernel(torch.full((2, 4, 3), 120, dtype=torch.uint8)) == "blocked"
    monkeypatch.setenv(mxfp4_experts.GPU_CAPABILITY_VARIABLE, "10.0")  # never above the card's own
    assert mxfp4_experts.gpu_capability() == (9, 0)
    monkeypatch.setenv(mxfp4_experts.GPU_CAPABILITY_VARIABLE, "ampere")
    with pytest.raises(ValueError, match="GPT_OSS_GPU_CAPABILITY='ampere' is not a compute capability"):
        mxfp4_experts.gpu_capability()


def test_a_card_older_than_ampere_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(model_loader.ModelLoadError, match=r"Tesla T4 has compute capability 7\.5; this project needs "
                                                           r"8\.0 or newer"):
        model_loader.check_gpu_generation("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    model_loader.check_gpu_generation("cuda")  # an RTX 3090: no error
