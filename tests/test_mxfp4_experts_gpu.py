"""MXFP4-resident experts on a GPU at the 20b shape: the Triton kernels against the plain-torch reference on the
stand-in's own packed weights, the backward, and the memory a loaded model takes.

    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony
    python -m pytest tests/test_mxfp4_experts_gpu.py -v -s     # GPT_OSS_20B_DIR=... to use another model directory
"""

import os
from pathlib import Path

import pytest
import torch

from gpu_engine import mxfp4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("GPT_OSS_20B_DIR", Path(__file__).resolve().parents[1] / "runs" / "stand-ins" /
                                "gpt-oss-20b-shape"))
BF16_TOLERANCE = 1e-2  # relative error of a bf16 product against the fp32 reference


@pytest.fixture(scope="module")
def loaded():
    """(model, GiB the loading added at its peak)."""
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no 20b-shaped model in {MODEL_DIR}: build it with `python tiny_gpt_oss.py --shape 20b`")
    import model_loader

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = model_loader.load_model(str(MODEL_DIR), device="cuda", experts_format="mxfp4")
    return model, (torch.cuda.max_memory_allocated() - before) / 2**30


def relative_error(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_loading_never_holds_the_experts_in_bf16(loaded):
    model, peak_gib = loaded
    print(f"\npeak while loading: {peak_gib:.2f} GiB")
    assert peak_gib < 16  # bf16 experts alone would be 35.6 GiB
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Mxfp4Experts" and experts.gate_up_proj_blocks.dtype == torch.uint8


def test_dequantisation_kernel_is_exact(loaded):
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[3].mlp.experts
    for blocks, scales in experts.matrices():
        out = mxfp4_experts.dequantize(blocks, scales, torch.bfloat16)
        assert torch.equal(out, mxfp4.dequantize_mxfp4(blocks, scales, torch.bfloat16))


@pytest.mark.parametrize("kernel", ["interleaved", "blocked", "transposed"])
@pytest.mark.parametrize("tokens", [1, 32, 64])
def test_dense_kernel_matches_the_reference(loaded, tokens, kernel):
    from gpu_engine import mxfp4_experts

    if kernel == "transposed" and mxfp4_experts.gpu_capability()[0] != 9:
        pytest.skip("the 'transposed' kernel runs on Hopper only (or GPT_OSS_GPU_CAPABILITY is set below 9)")

    experts = loaded[0].model.layers[5].mlp.experts
    torch.manual_seed(tokens)
    for (blocks, scales), bias, shared in ((experts.matrices()[0], experts.gate_up_proj_bias, True),
                                           (experts.matrices()[1], experts.down_proj_bias, False)):
        weight = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)  # [E, out, in]
        shape = (tokens, weight.shape[2]) if shared else (weight.shape[0], tokens, weight.shape[2])
        x = torch.randn(shape, device="cuda").to(torch.bfloat16)
        out = torch.full((weight.shape[0], tokens, weight.shape[1]), float("nan"), device="cuda")  # poisoned
        out = mxfp4_experts.dense_matmul(x, blocks, scales, bias, kernel=kernel)
        inputs = x.float().expand(weight.shape[0], -1, -1) if shared else x.float()
        ref = torch.bmm(inputs, weight.transpose(1, 2)) + bias.float()[:, None]
        error = relative_error(out, ref)
        print(f"\n{kernel} kernel, {tokens} tokens, {'gate_up' if shared else 'down'}: relative error {error:.2e}")
        assert error <= BF16_TOLERANCE


def test_transposed_kernel_over_its_whole_scale_range_and_its_choice():
    """Every scale byte 'transposed' accepts (mxfp4_experts.TRANSPOSED_SCALE_BYTES, ends included) against the fp32
    reference, with a weight width that is not a multiple of its tiles; 'auto' takes it on Hopper for such weights
    and falls back to 'blocked' when one byte lies outside (and on any other card, or with GPT_OSS_GPU_CAPABILITY
    below 9)."""
    from gpu_engine import mxfp4_experts

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the 'transposed' kernel runs on Hopper only")

    torch.manual_seed(0)
    low, high = mxfp4_experts.TRANSPOSED_SCALE_BYTES
    experts, out_features, in_features = 4, 200, 2880 + 32
    blocks = torch.randint(0, 256, (experts, out_features, in_features // 32, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(low, high + 1, (experts, out_features, in_features // 32), dtype=torch.uint8,
                           device="cuda")
    scales[0, 0, :2] = torch.tensor([low, high], dtype=torch.uint8)
    bias = torch.randn(experts, out_features, device="cuda").to(torch.bfloat16)
    weight = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)
    for tokens in (1, 7, 32, 64):
        x = torch.randn(experts, tokens, in_features, device="cuda").to(torch.bfloat16)
        out = mxfp4_experts.dense_matmul(x, blocks, scales, bias, kernel="transposed")
        ref = torch.bmm(x.float(), weight.transpose(1, 2)) + bias.float()[:, None]
        error = relative_error(out, ref)
        print(f"\ntransposed kernel, scale bytes {low}..{high}, {tokens} tokens: relative error {error:.2e}")
        assert error <= BF16_TOLERANCE
    hopper = mxfp4_experts.gpu_capability()[0] == 9
    assert mxfp4_experts.choose_dense_kernel(scales) == ("transposed" if hopper else "blocked")
    scales[1, 2, 3] = low - 1
    assert mxfp4_experts.choose_dense_kernel(scales) == "blocked"


def test_the_swiglu_in_the_kernels_last_step_is_the_plain_swiglu_laid_out(loaded):
    """gate_up_swiglu (the 'transposed' kernel computing the activation in its epilogue, stored in the down call's
    input layout) against the plain path: dense_matmul, then mxfp4_experts.swiglu in bf16 (every step rounded, as
    the kernel rounds it and the training forward does), laid out by kernel_input. Equal but for the rare value
    where the two sigmoids' last fp32 bit moves a bf16 rounding."""
    from gpu_engine import mxfp4_experts

    if mxfp4_experts.choose_dense_kernel(loaded[0].model.layers[3].mlp.experts.gate_up_proj_scales) != "transposed":
        pytest.skip("the 'transposed' kernel needs Hopper or newer")
    experts = loaded[0].model.layers[3].mlp.experts
    (blocks, scales), bias = experts.matrices()[0], experts.gate_up_proj_bias
    torch.manual_seed(3)
    for tokens in (1, 32, 64):
        x = mxfp4_experts.kernel_input(torch.randn(tokens, experts.hidden_size, device="cuda").to(torch.bfloat16),
                                       "transposed")
        laid_out = mxfp4_experts.scales_for_transposed(scales)
        fused = torch.ops.gpt_oss_mxfp4.gate_up_swiglu(x, blocks, laid_out, bias, experts.limit, experts.alpha)
        gate_up = torch.ops.gpt_oss_mxfp4.dense_matmul(x, blocks, laid_out, bias, "transposed")
        plain = mxfp4_experts.swiglu(gate_up, experts.limit, experts.alpha)  # bf16 in, each op rounded
        expected = mxfp4_experts.kernel_input(plain, "transposed")
        equal = (fused == expected).float().mean().item()
        print(f"\nSwiGLU in the kernel, {tokens} tokens: {100 * equal:.3f} % of values bit-equal")
        assert fused.shape == expected.shape and equal > 0.999
        assert relative_error(fused, expected) < 1e-3


def test_dense_forward_matches_the_grouped_reference(loaded):
    """The decode path (Triton) and the many-rows path (dequantised + grouped matmul) compute one function."""
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[7].mlp.experts
    torch.manual_seed(0)
    h = torch.randn(32, experts.hidden_size, device="cuda").to(torch.bfloat16)
    index = torch.stack([torch.randperm(experts.num_experts, device="cuda")[:4] for _ in range(32)])
    scores = torch.softmax(torch.randn(32, 4, device="cuda"), -1).to(torch.bfloat16)
    with torch.no_grad():
        dense = mxfp4_experts.dense_forward(experts, h, index, scores)
        grouped = mxfp4_experts.grouped_forward(experts, h, index, scores)
    error = relative_error(dense, grouped)
    print(f"\ndense vs grouped experts: relative error {error:.2e}")
    assert error <= BF16_TOLERANCE


def test_a_routed_decode_step_equals_every_token_through_every_expert(loaded):
    """mxfp4_experts.routed_experts (each expert multiplies only its own tokens, 16 rows a program, idle programs past
    its rows) against dense_experts (all 32 tokens through all experts) at the 20b shape, both with the
    'transposed' kernel and the combine kernel: the same products for every routed pair. Also with one expert given
    17 tokens (a second row tile) and one given none."""
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[9].mlp.experts
    tensors = mxfp4_experts.dense_tensors(experts)
    assert tensors[8] == "transposed"
    torch.manual_seed(0)
    tokens = 32
    h = torch.randn(tokens, experts.hidden_size, device="cuda").to(torch.bfloat16)
    # experts 2.. at random; then expert 0 for the first 17 tokens, expert 1 for none
    index = torch.stack([2 + torch.randperm(experts.num_experts - 2, device="cuda")[:4] for _ in range(tokens)])
    index[:17, 0] = 0
    scores = torch.softmax(torch.randn(tokens, 4, device="cuda"), -1).to(torch.bfloat16)
    routing = mxfp4_experts.routing_matrix(index, scores, experts.num_experts)
    offsets = mxfp4_experts.routed_rows(routing, tokens * 4)[2]
    assert offsets[1] - offsets[0] == 17 > mxfp4_experts.ROUTED_ROW_TILE and offsets[2] == offsets[1]
    with torch.no_grad():
        routed = mxfp4_experts.routed_experts(h, routing, tensors, 4, combine_kernel=True)
        mxfp4_experts.DECODE_ROUTED = False
        try:
            dense = mxfp4_experts.dense_experts(h, routing, tensors, combine_kernel=True)
        finally:
            mxfp4_experts.DECODE_ROUTED = True
    equal = (routed == dense).float().mean().item()
    print(f"\nrouted vs dense decode experts: {equal:.4%} of values equal, relative error "
          f"{relative_error(routed, dense):.2e}")
    assert equal > 0.999
    assert relative_error(routed, dense) <= BF16_TOLERANCE


@pytest.mark.parametrize("transpose", [False, True])
def test_the_fused_grouped_matmul_matches_the_reference(loaded, transpose, monkeypatch):
    """mxfp4_kernels.grouped_matmul_kernel at the 20b shape, rows grouped by expert (some experts with none, one
    with more than any row tile), against fp32 products through the dequantised weights, and against the
    'dequantize' path (a bf16 copy of the matrix, torch's grouped matmul) that it replaces."""
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[9].mlp.experts
    blocks, scales = experts.matrices()[0]  # gate_up [E, 2I, H / 32, 16]
    torch.manual_seed(3)
    counts = torch.randint(0, 40, (experts.num_experts,))
    counts[[2, 17]] = 0
    counts[5] = 700
    counts = counts.cuda()
    width = scales.shape[1] if transpose else scales.shape[-1] * mxfp4.BLOCK_SIZE
    x = torch.randn(int(counts.sum()), width, device="cuda").to(torch.bfloat16)
    expert_of_row = torch.repeat_interleave(torch.arange(experts.num_experts, device="cuda"), counts)
    bias = None if transpose else experts.gate_up_proj_bias
    fused = mxfp4_experts.fused_grouped_matmul(x, counts, blocks, scales, transpose, bias)
    monkeypatch.setenv(mxfp4_experts.GROUPED_MATMUL_VARIABLE, "dequantize")
    plain = mxfp4_experts.grouped_matmul(x, counts, blocks, scales, transpose, bias, expert_of_row)
    reference = torch.empty(fused.shape, device="cuda")
    start = 0
    for e, count in enumerate(counts.tolist()):
        weight = mxfp4.dequantize_mxfp4(blocks[e], scales[e], torch.float32)
        product = x[start:start + count].float() @ (weight if transpose else weight.t())
        reference[start:start + count] = product + (0 if bias is None else bias[e].float())
        start += count
    error, versus_plain = relative_error(fused, reference), relative_error(fused, plain)
    print(f"\nfused grouped matmul (transpose={transpose}): relative error {error:.2e}, vs 'dequantize' "
          f"{versus_plain:.2e}")
    assert fused.dtype == torch.bfloat16 and error <= BF16_TOLERANCE and versus_plain <= BF16_TOLERANCE


def test_the_fused_grouped_matmul_reads_every_code_exactly():
    """One-hot rows read the weights back through the tensor cores: every code under scale bytes 2 .. 200 exact in
    bf16, forward and transposed; scale byte 0 a block of zeros, as in the other kernels."""
    from gpu_engine import mxfp4_experts

    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # every byte: every pair of codes
    scale_bytes = torch.tensor([0, 2, 100, 127, 128, 200], dtype=torch.uint8)
    blocks = codes[None, :, None, :].expand(len(scale_bytes), 16, 1, 16).reshape(1, -1, 1, 16).contiguous().cuda()
    scales = scale_bytes[:, None].expand(-1, 16).reshape(1, -1, 1).contiguous().cuda()
    exact = mxfp4.dequantize_mxfp4(blocks, scales, torch.float32)[0]  # [96, 32]
    exact[:16] = 0  # scale byte 0
    rows = exact.shape[0]
    forward = mxfp4_experts.fused_grouped_matmul(torch.eye(32, device="cuda", dtype=torch.bfloat16),
                                                 torch.tensor([32], device="cuda"), blocks, scales, False)
    backward = mxfp4_experts.fused_grouped_matmul(torch.eye(rows, device="cuda", dtype=torch.bfloat16),
                                                  torch.tensor([rows], device="cuda"), blocks, scales, True)
    assert torch.equal(forward.float(), exact.t()) and torch.equal(backward.float(), exact)


def test_the_fused_swiglu_rounds_as_eager_torch_and_its_gradient_matches():
    """swiglu_kernel.FusedSwiglu against mxfp4_experts.swiglu in bf16: the activation's values equal (but where the
    two sigmoids part in float32's last bit across a rounding boundary), the gradient as close to float32's as
    eager autograd's."""
    from gpu_engine import mxfp4_experts
    from gpu_engine.swiglu_kernel import FusedSwiglu

    torch.manual_seed(5)
    gate_up = (torch.randn(3000, 2 * 2880, device="cuda") * 4).to(torch.bfloat16)
    gate_up[0, 0] = gate_up[1, 3] = float("nan")  # a NaN gate and a NaN up stay NaN, as torch's clamp keeps them
    limit, alpha = 7.0, 1.702
    grad = torch.randn(3000, 2880, device="cuda").to(torch.bfloat16)
    results = {}
    for name, fn, dtype in (("fused", FusedSwiglu.apply, torch.bfloat16), ("eager", mxfp4_experts.swiglu, torch.bfloat16),
                            ("float32", mxfp4_experts.swiglu, torch.float32)):
        x = gate_up.detach().to(dtype).clone().requires_grad_()  # each its own leaf
        out = fn(x, limit, alpha)
        out.backward(grad.to(dtype))
        results[name] = (out.detach().float(), x.grad.float())
    assert torch.equal(results["fused"][0].isnan(), results["eager"][0].isnan())
    assert results["fused"][0][:2].isnan().sum() == 2
    results = {name: (out[2:], grad[2:]) for name, (out, grad) in results.items()}  # the rows without a NaN
    equal = (results["fused"][0] == results["eager"][0]).float().mean().item()
    print(f"\nfused swiglu: {equal:.5%} of activations equal eager's")
    assert equal > 0.999
    fused_error = relative_error(results["fused"][1], results["float32"][1])
    eager_error = relative_error(results["eager"][1], results["float32"][1])
    print(f"gradient's relative error to float32: fused {fused_error:.2e}, eager {eager_error:.2e}")
    assert fused_error <= eager_error + 1e-4


@pytest.fixture(params=["dequantize", "fused"])
def grouped_matmul(request, monkeypatch):
    """Each of mxfp4_experts.GROUPED_MATMUL's choices, for the test that takes this fixture."""
    from gpu_engine import mxfp4_experts

    monkeypatch.setenv(mxfp4_experts.GROUPED_MATMUL_VARIABLE, request.param)
    return request.param


def test_the_many_rows_forward_holds_one_dequantised_matrix_and_nothing_beside_it(loaded, monkeypatch):
    """The 'dequantize' path's peak is the gate_up matrix in bf16 beside its input and output rows: the bias' row-
    sized tensors come after the matrix is freed (with them beside it, the peak would be two output sizes higher)."""
    from gpu_engine import mxfp4_experts

    monkeypatch.setenv(mxfp4_experts.GROUPED_MATMUL_VARIABLE, "dequantize")
    experts = loaded[0].model.layers[6].mlp.experts
    torch.manual_seed(6)
    tokens = 3000
    h = torch.randn(tokens, experts.hidden_size, device="cuda").to(torch.bfloat16)
    index = torch.stack([torch.randperm(experts.num_experts, device="cuda")[:4] for _ in range(tokens)])
    scores = torch.softmax(torch.randn(tokens, 4, device="cuda"), -1).to(torch.bfloat16)
    with torch.no_grad():
        mxfp4_experts.grouped_forward(experts, h, index, scores)  # the kernels' first launch, outside the figure
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        mxfp4_experts.grouped_forward(experts, h, index, scores)
        peak = torch.cuda.max_memory_allocated() - base
    pairs, two = tokens * 4, torch.tensor([], dtype=torch.bfloat16).element_size()
    matrix = experts.num_experts * 2 * experts.intermediate_size * experts.hidden_size * two
    rows_in, rows_out = pairs * experts.hidden_size * two, pairs * 2 * experts.intermediate_size * two
    print(f"\nmany-rows forward: peak {peak / 2**30:.2f} GiB beside the model; matrix {matrix / 2**30:.2f} GiB, "
          f"rows in {rows_in / 2**30:.2f}, rows out {rows_out / 2**30:.2f}")
    assert peak <= matrix + rows_in + rows_out + 2**26  # 64 MiB for the indices and the allocator's rounding


def test_the_many_rows_forward_and_backward_never_wait_for_the_gpu(loaded, grouped_matmul):
    """The training forward and backward of the experts queue their kernels without reading anything back to the
    host (a read-back in every layer would stall the queue 24 times a pass): torch's sync debug mode raises on one.
    Below Hopper the 'dequantize' choice loops over the experts on the host, so only 'fused' is held to it there."""
    from gpu_engine import mxfp4_experts

    if grouped_matmul == "dequantize" and not mxfp4_experts.grouped_mm_fused("cuda"):
        pytest.skip("torch's grouped_mm loops on the host below Hopper")
    experts = loaded[0].model.layers[2].mlp.experts
    torch.manual_seed(4)
    rows = 500
    h = torch.randn(rows, experts.hidden_size, device="cuda").to(torch.bfloat16).requires_grad_()
    index = torch.stack([torch.randperm(experts.num_experts, device="cuda")[:4] for _ in range(rows)])
    scores = torch.softmax(torch.randn(rows, 4, device="cuda"), -1).to(torch.bfloat16)
    mxfp4_experts.grouped_forward(experts, h, index, scores).sum().backward()  # the autotuner's runs, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mxfp4_experts.grouped_forward(experts, h, index, scores).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_backward_gives_the_input_gradient_through_the_packed_weights(loaded, grouped_matmul):
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[11].mlp.experts
    torch.manual_seed(1)
    rows = 300
    h = torch.randn(rows, experts.hidden_size, device="cuda").to(torch.bfloat16).requires_grad_()
    index = torch.stack([torch.randperm(experts.num_experts, device="cuda")[:4] for _ in range(rows)])
    scores = torch.softmax(torch.randn(rows, 4, device="cuda"), -1).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(rows, experts.hidden_size, device="cuda").to(torch.bfloat16)
    mxfp4_experts.grouped_forward(experts, h, index, scores).backward(grad)
    # reference: fp32 autograd through the dequantised weights
    gate_up = mxfp4.dequantize_mxfp4(*experts.matrices()[0], torch.float32)
    down = mxfp4.dequantize_mxfp4(*experts.matrices()[1], torch.float32)
    h_ref = h.detach().float().requires_grad_()
    scores_ref = scores.detach().float().requires_grad_()
    out = reference_experts(h_ref, index, scores_ref, (gate_up, down),
                            (experts.gate_up_proj_bias.float(), experts.down_proj_bias.float()),
                            lambda y: mxfp4_experts.swiglu(y, experts.limit, experts.alpha))
    out.backward(grad.float())
    for name, got, ref in (("input", h.grad, h_ref.grad), ("routing weights", scores.grad, scores_ref.grad)):
        error = relative_error(got, ref)
        print(f"\n{name} gradient: relative error {error:.2e}")
        assert error <= 2 * BF16_TOLERANCE  # two bf16 matmuls and a bf16 SwiGLU on the way


def test_expert_lora_terms_and_their_gradients_match_the_reference(loaded, grouped_matmul):
    """An expert LoRA beside the packed weights (low-rank terms, grouped matmuls on the GPU): output, input and
    factor gradients against fp32 autograd through the dequantised weights plus the LoRA; the decode path (Triton
    kernels, no gradient) computes the same function."""
    from gpu_engine import mxfp4_experts

    experts = loaded[0].model.layers[5].mlp.experts
    e, h_size, i_size, rank, scale = experts.num_experts, experts.hidden_size, experts.intermediate_size, 16, 2.0
    torch.manual_seed(2)
    shapes = {"gate_up_proj": (h_size, 2 * i_size), "down_proj": (i_size, h_size)}
    factors = {name: (torch.randn(e, n_in, rank, device="cuda") * n_in ** -0.5,
                      torch.randn(e, rank, n_out, device="cuda") * 0.02, scale)
               for name, (n_in, n_out) in shapes.items()}
    for a, b, _ in factors.values():
        a.requires_grad_()
        b.requires_grad_()
    rows = 300
    h = torch.randn(rows, h_size, device="cuda").to(torch.bfloat16).requires_grad_()
    index = torch.stack([torch.randperm(e, device="cuda")[:4] for _ in range(rows)])
    scores = torch.softmax(torch.randn(rows, 4, device="cuda"), -1).to(torch.bfloat16)
    grad = torch.randn(rows, h_size, device="cuda").to(torch.bfloat16)
    out = mxfp4_experts.grouped_forward(experts, h, index, scores, factors)
    out.backward(grad)
    got = {"output": out.detach(), "input": h.grad} | {
        f"{name} {part}": t.grad for name, (a, b, _) in factors.items() for part, t in (("A", a), ("B", b))}
    # reference: fp32 autograd through the dequantised weights and the same factors
    weights = [mxfp4.dequantize_mxfp4(*m, torch.float32) for m in experts.matrices()]
    h_ref = h.detach().float().requires_grad_()
    ref_factors = {name: (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), s)
                   for name, (a, b, s) in factors.items()}
    biases = (experts.gate_up_proj_bias.float(), experts.down_proj_bias.float())
    out_ref = reference_experts(h_ref, index, scores.float(), weights, biases,
                                lambda y: mxfp4_experts.swiglu(y, experts.limit, experts.alpha), ref_factors)
    out_ref.backward(grad.float())
    ref = {"output": out_ref.detach(), "input": h_ref.grad} | {
        f"{name} {part}": t.grad for name, (a, b, _) in ref_factors.items() for part, t in (("A", a), ("B", b))}
    for name in ref:
        error = relative_error(got[name], ref[name])
        print(f"\nexpert LoRA, {name}: relative error {error:.2e}")
        assert error <= 2 * BF16_TOLERANCE  # two bf16 matmuls and a bf16 SwiGLU on the way
    with torch.no_grad():
        few = slice(0, 32)
        dense = mxfp4_experts.dense_forward(experts, h[few], index[few], scores[few], factors)
        grouped = mxfp4_experts.grouped_forward(experts, h[few], index[few], scores[few], factors)
    error = relative_error(dense, grouped)
    print(f"\nexpert LoRA, dense vs grouped: relative error {error:.2e}")
    assert error <= BF16_TOLERANCE


def reference_experts(h, index, scores, weights, biases, activation, factors=None):
    """fp32 gpt-oss experts, one expert at a time over the rows routed to it (a gather of every row's weights would
    hold rows x a whole matrix: ~20 GB at 300 rows of the 20b shape): sum over k of scores[:, k] x the down
    projection of activation(the gate_up projection), with an expert LoRA's `factors` ({name: (A, B, scale)})
    added to each projection. Differentiable in h, scores and the factors."""
    out = torch.zeros(h.shape[0], weights[1].shape[1], device=h.device)
    lora = list((factors or {}).values()) or [None, None]
    for expert in index.unique().tolist():
        rows, slot = (index == expert).nonzero(as_tuple=True)
        y = h[rows]
        for step, (weight, bias, factor) in enumerate(zip(weights, biases, lora)):
            if step == 1:
                y = activation(y)
            projected = y @ weight[expert].t() + bias[expert]
            if factor is not None:
                a, b, scale = factor
                projected = projected + (y @ a[expert]) @ b[expert] * scale
            y = projected
        out = out.index_add(0, rows, y * scores[rows, slot][:, None])
    return out
