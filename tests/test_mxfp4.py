"""Tests for gpu_engine/mxfp4.py: the e2m1 codec, the gpt-oss checkpoint layout, agreement with transformers' loader."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gpu_engine.mxfp4 import (
    CheckpointError,
    check_mxfp4_checkpoint,
    dequantize_expert_weights,
    dequantize_mxfp4,
    mxfp4_quantization_config,
    mxfp4_state_dict,
    quantize_expert_weights,
    quantize_mxfp4,
    read_safetensors_header,
    save_mxfp4_checkpoint,
)

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
EXPERT_NAMES = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a float tensor as integers, so -0.0 != 0.0 and comparisons are bit for bit."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes [..., 32] into MXFP4 bytes [..., 16], low nibble = even element."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def random_blocks(num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks whose largest code magnitude varies over every level 0..7, with signed zeros.

    Returns (blocks uint8 [B, 1, 16], scales uint8 [B, 1], largest magnitude code per block [B]).
    """
    g = torch.Generator().manual_seed(seed)
    max_code = torch.arange(num_blocks) % 8
    magnitude = (torch.rand(num_blocks, 32, generator=g) * (max_code[:, None] + 1)).floor().to(torch.uint8)
    magnitude[:, 0] = max_code.to(torch.uint8)  # make the intended maximum actually occur
    sign = torch.randint(0, 2, (num_blocks, 32), generator=g, dtype=torch.uint8) << 3
    scales = torch.randint(100, 140, (num_blocks,), generator=g, dtype=torch.uint8)
    return pack_codes(magnitude | sign).unsqueeze(1), scales.unsqueeze(1), max_code


def tiny_config() -> GptOssConfig:
    """A gpt-oss small enough for CPU tests: hidden 64, 2 layers, 4 experts top-2, head dim 16."""
    return GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    """fp32 weights of the tiny gpt-oss; expert rows spread over many magnitudes, one all-zero expert row."""
    torch.manual_seed(0)
    state_dict = {k: v.clone() for k, v in GptOssForCausalLM(tiny_config()).state_dict().items()}
    for name in EXPERT_NAMES:
        w = torch.randn_like(state_dict[name])
        w *= torch.exp2(torch.randint(-12, 4, (w.shape[0], 1, w.shape[2])).float())
        state_dict[name] = w
    state_dict[EXPERT_NAMES[0]][1, :, 3] = 0.0
    return state_dict


@pytest.fixture(scope="module")
def single_file_checkpoint(tiny_state_dict, tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("ckpt") / "model")
    save_mxfp4_checkpoint(tiny_state_dict, tiny_config(), out_dir)
    return out_dir


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_state_dict, tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("sharded") / "model")
    save_mxfp4_checkpoint(tiny_state_dict, tiny_config(), out_dir, max_shard_bytes=20_000)
    return out_dir


# ---------------------------------------------------------------------------------------------- codec


def test_every_grid_value_gets_its_e2m1_code_low_nibble_first():
    values = torch.cat([GRID, -GRID, GRID, -GRID])  # 32 values, max 6 -> scale 1
    blocks, scales = quantize_mxfp4(values)
    assert scales.tolist() == [127]
    expected = pack_codes(torch.cat([torch.arange(16), torch.arange(16)]))
    assert torch.equal(blocks.reshape(-1), expected)
    assert blocks[0, 0].item() == 0x10  # element 0 (code 0) low nibble, element 1 (0.5 -> code 1) high


def test_scale_is_two_to_the_ceil_of_log2_amax_over_6():
    amax = [6.0, 6.0001, 4.0, 3.0, 3.0001, 2.0, 0.5, 1e-3, 7e4, 2.0**-120, 3 * 2.0**-60]
    for a in amax:
        block = torch.zeros(32, dtype=torch.float64)
        block[5] = -a
        _, scales = quantize_mxfp4(block)
        assert scales.item() - 127 == math.ceil(math.log2(a / 6)), a


def test_scale_rule_never_clips_random_blocks():
    torch.manual_seed(1)
    w = torch.randn(512, 32) * torch.exp2(torch.randint(-30, 30, (512, 1)).float())
    _, scales = quantize_mxfp4(w)
    scale = torch.exp2(scales.squeeze(-1).float() - 127)
    assert bool((w.abs().amax(-1) <= 6 * scale).all())
    # and it is the smallest such power of two: half the scale would clip
    assert bool((w.abs().amax(-1) > 3 * scale).all())


def test_all_zero_block_gets_scale_byte_0_and_keeps_negative_zero():
    block = torch.zeros(64)
    block[1] = -0.0
    blocks, scales = quantize_mxfp4(block)
    assert scales.tolist() == [0, 0]
    assert blocks[0, 0].item() == 0x80 and int(blocks.sum()) == 0x80
    assert torch.equal(bits(dequantize_mxfp4(blocks, scales, torch.float32)), bits(block))


def test_ties_round_to_the_even_code():
    # scale 1 (6 is present); each tie sits halfway between two grid points
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    block = torch.cat([ties, -ties, torch.full((18,), 6.0)])
    got = dequantize_mxfp4(*quantize_mxfp4(block), torch.float32)
    assert torch.equal(got[:14], torch.cat([expected, -expected]))


def test_round_trip_error_is_at_most_half_the_local_grid_spacing():
    """Per element, |x - q(x)| <= scale * (0.25 if |x|/scale <= 2, 0.5 if <= 4, else 1).

    Those are half the e2m1 grid spacings (0.5 below 2, 1 below 4, 2 up to 6). Per block this gives
    |err| <= scale < amax / 3.
    """
    torch.manual_seed(2)
    w = torch.randn(64, 8, 256) * torch.exp2(torch.randint(-20, 20, (64, 8, 1)).float())
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    q = w.abs() / scale
    half_spacing = torch.where(q <= 2, 0.25, torch.where(q <= 4, 0.5, 1.0))
    err = (w - back).abs()
    assert bool((err <= half_spacing * scale).all())
    assert bool((err.reshape(64, 8, 8, 32).amax(-1) < w.abs().reshape(64, 8, 8, 32).amax(-1) / 3).all())
    # and it is the nearest grid point: no other grid value of the block's scale is closer
    candidates = torch.cat([GRID, -GRID]) * scale[..., None]
    assert bool((err <= (w[..., None] - candidates).abs().amin(-1)).all())


def test_quantize_rejects_non_finite_values_and_ragged_last_dim():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_mxfp4(torch.tensor([float("nan")] + [0.0] * 31))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(4, 48))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_then_quantize_reproduces_mxfp4_values_exactly(dtype):
    blocks, scales, _ = random_blocks(4096, seed=3)
    values = dequantize_mxfp4(blocks, scales, dtype)
    again = dequantize_mxfp4(*quantize_mxfp4(values), dtype)
    assert torch.equal(bits(again), bits(values))


def test_requantized_bytes_match_exactly_when_the_block_max_code_is_4_or_6():
    """The ceil rule re-derives the original scale only when amax/scale is in (3, 6]: codes 4 and 6.

    A block whose largest magnitude is 3 or 2 comes back at half the scale (codes doubled), 1.5 or 1
    at a quarter, 0.5 at an eighth; same values, other bytes.
    """
    blocks, scales, max_code = random_blocks(4096, seed=4)
    new_blocks, new_scales = quantize_mxfp4(dequantize_mxfp4(blocks, scales))
    same = max_code >= 6
    assert torch.equal(new_blocks[same], blocks[same]) and torch.equal(new_scales[same], scales[same])
    shift = {5: 1, 4: 1, 3: 2, 2: 2, 1: 3}  # code -> log2 of how much the scale drops
    for code, k in shift.items():
        rows = max_code == code
        assert torch.equal(new_scales[rows].int(), scales[rows].int() - k), code
        assert not torch.equal(new_blocks[rows], blocks[rows]), code
    zero = max_code == 0
    assert bool((new_scales[zero] == 0).all()) and torch.equal(new_blocks[zero], blocks[zero])


def test_like_scales_reproduce_the_checkpoint_bytes_exactly():
    blocks, scales, _ = random_blocks(4096, seed=5)
    new_blocks, new_scales = quantize_mxfp4(dequantize_mxfp4(blocks, scales), like_scales=scales)
    assert torch.equal(new_blocks, blocks) and torch.equal(new_scales, scales)


def test_like_scales_grow_where_changed_weights_need_it_and_never_clip():
    blocks, scales, _ = random_blocks(256, seed=6)
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    values[::2] *= 5  # a changed block can outgrow its original scale
    new_blocks, new_scales = quantize_mxfp4(values, like_scales=scales)
    assert bool((new_scales >= scales).all()) and bool((new_scales[::2] > scales[::2]).any())
    scale = torch.exp2(new_scales.float() - 127)  # [B, 1], one block a row
    assert bool((values.abs() <= 6 * scale).all())
    err = (dequantize_mxfp4(new_blocks, new_scales, torch.float32) - values).abs()
    assert bool((err <= scale).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dequantize_matches_transformers_on_every_byte_and_scale(dtype):
    # every byte value in every byte position, every scale byte 0..255 (255 overflows: inf/nan in both)
    blocks = ((torch.arange(2 * 128 * 16).reshape(2, 128, 16, 1) + torch.arange(16)) % 256).to(torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8).reshape(2, 128, 1).repeat(1, 1, 16)
    ours = dequantize_expert_weights(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (2, 16 * 32, 128)
    assert torch.equal(bits(ours), bits(theirs))


# ---------------------------------------------------------------------------------------------- layout


def test_expert_weights_are_stored_transposed_in_blocks_along_the_input_dim():
    torch.manual_seed(7)
    gate_up = torch.randn(3, 64, 96)  # [E, H, 2I]
    tensors = quantize_expert_weights("model.layers.0.mlp.experts.gate_up_proj", gate_up)
    blocks = tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    scales = tensors["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    reference = quantize_mxfp4(gate_up.transpose(1, 2))
    assert torch.equal(blocks, reference[0]) and torch.equal(scales, reference[1])
    back = dequantize_expert_weights(blocks, scales, torch.float32)
    assert back.shape == gate_up.shape and back.is_contiguous()
    assert torch.equal(back, dequantize_mxfp4(*reference, torch.float32).transpose(1, 2))


def test_quantize_expert_weights_names_the_tensor_on_a_bad_shape():
    with pytest.raises(AssertionError, match=r"layers\.3\.mlp\.experts\.down_proj.*multiple of 32"):
        quantize_expert_weights("model.layers.3.mlp.experts.down_proj", torch.zeros(2, 40, 64))
    with pytest.raises(ValueError, match="not a gpt-oss expert weight"):
        quantize_expert_weights("model.layers.3.mlp.router.weight", torch.zeros(2, 64, 64))


def test_mxfp4_state_dict_converts_expert_weights_and_passes_everything_else(tiny_state_dict):
    converted = mxfp4_state_dict(tiny_state_dict)
    for name in EXPERT_NAMES:
        assert name not in converted
        assert converted[f"{name}_blocks"].dtype == converted[f"{name}_scales"].dtype == torch.uint8
    rest = [k for k in tiny_state_dict if k not in EXPERT_NAMES]
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in rest
    assert all(converted[k] is tiny_state_dict[k] for k in rest)
    assert len(converted) == len(tiny_state_dict) + len(EXPERT_NAMES)


def test_quantization_config_is_the_one_gpt_oss_ships():
    assert mxfp4_quantization_config() == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    spelled_out = mxfp4_quantization_config(2)["modules_to_not_convert"]
    assert spelled_out == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
        "model.layers.0.mlp.router",
        "model.layers.1.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ]


def test_single_file_checkpoint_layout(single_file_checkpoint, tiny_state_dict):
    files = sorted(os.listdir(single_file_checkpoint))
    assert files == ["config.json", "model.safetensors"]
    with open(os.path.join(single_file_checkpoint, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert config["quantization_config"] == mxfp4_quantization_config()
    header = read_safetensors_header(os.path.join(single_file_checkpoint, "model.safetensors"))
    E, H, I = 4, 64, 64  # noqa: E741 (experts, hidden, intermediate)
    for layer in range(2):
        base = f"model.layers.{layer}.mlp.experts"
        expected = {
            "gate_up_proj_blocks": [E, 2 * I, H // 32, 16],
            "gate_up_proj_scales": [E, 2 * I, H // 32],
            "down_proj_blocks": [E, H, I // 32, 16],
            "down_proj_scales": [E, H, I // 32],
        }
        for suffix, shape in expected.items():
            assert header[f"{base}.{suffix}"]["dtype"] == "U8"
            assert header[f"{base}.{suffix}"]["shape"] == shape
        assert header[f"{base}.gate_up_proj_bias"]["dtype"] == "BF16"
        assert f"{base}.gate_up_proj" not in header
    expected_rest = {k for k in tiny_state_dict if k not in EXPERT_NAMES}
    assert {k for k, v in header.items() if v["dtype"] == "BF16"} == expected_rest
    check_mxfp4_checkpoint(single_file_checkpoint)


def test_sharded_checkpoint_keeps_each_pair_in_one_shard_blocks_first(sharded_checkpoint):
    with open(os.path.join(sharded_checkpoint, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    headers = {s: read_safetensors_header(os.path.join(sharded_checkpoint, s)) for s in shards}
    for shard, header in headers.items():
        assert all(index["weight_map"][name] == shard for name in header)
    assert index["metadata"]["total_size"] == sum(
        v["data_offsets"][1] - v["data_offsets"][0] for h in headers.values() for v in h.values()
    )
    for name in EXPERT_NAMES:
        shard = index["weight_map"][f"{name}_blocks"]
        assert index["weight_map"][f"{name}_scales"] == shard
        order = list(headers[shard])
        blocks, scales = headers[shard][f"{name}_blocks"], headers[shard][f"{name}_scales"]
        assert blocks["data_offsets"][1] <= scales["data_offsets"][0]
        assert order.index(f"{name}_blocks") < order.index(f"{name}_scales")
    check_mxfp4_checkpoint(sharded_checkpoint)


def test_sharded_and_single_file_checkpoints_hold_the_same_tensors(sharded_checkpoint, single_file_checkpoint):
    single = load_file(os.path.join(single_file_checkpoint, "model.safetensors"))
    sharded = {}
    for file in os.listdir(sharded_checkpoint):
        if file.endswith(".safetensors"):
            sharded.update(load_file(os.path.join(sharded_checkpoint, file)))
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transformers_dequantize_load_matches_ours_bit_for_bit(single_file_checkpoint, dtype):
    model = AutoModelForCausalLM.from_pretrained(
        single_file_checkpoint, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype
    )
    saved = load_file(os.path.join(single_file_checkpoint, "model.safetensors"))
    params = dict(model.named_parameters())
    assert getattr(model.config, "quantization_config", None) is None  # a plain model PEFT can take
    for name in EXPERT_NAMES:
        loaded = params[name].data
        # transformers 5.24 dequantises into the parameter's dtype; 5.17 always into bf16, whatever
        # dtype was asked for. MXFP4 values are exact in both, so the values agree either way.
        assert loaded.dtype in (dtype, torch.bfloat16), name
        ours = dequantize_expert_weights(saved[f"{name}_blocks"], saved[f"{name}_scales"], loaded.dtype)
        assert loaded.shape == ours.shape and torch.equal(bits(loaded), bits(ours)), name
        exact = dequantize_expert_weights(saved[f"{name}_blocks"], saved[f"{name}_scales"], torch.float32)
        assert torch.equal(loaded.float(), exact), name
    rest = [k for k in saved if not k.endswith(("_blocks", "_scales"))]
    assert set(rest) | set(EXPERT_NAMES) == set(params)
    for name in rest:
        assert torch.equal(params[name].data.to(torch.bfloat16), saved[name]), name


def test_save_writes_given_blocks_and_scales_through_untouched(tiny_state_dict, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj"
    blocks, scales, _ = random_blocks(4 * 64 * 2, seed=8)  # reshaped below to [E, H, I/32, ...]
    original = {f"{name}_blocks": blocks.reshape(4, 64, 2, 16), f"{name}_scales": scales.reshape(4, 64, 2)}
    state_dict = {k: v for k, v in tiny_state_dict.items() if k != name} | original
    save_mxfp4_checkpoint(state_dict, tiny_config(), str(tmp_path / "m"), max_shard_bytes=20_000)
    check_mxfp4_checkpoint(str(tmp_path / "m"))
    written = {}
    for file in os.listdir(tmp_path / "m"):
        if file.endswith(".safetensors"):
            written.update(load_file(str(tmp_path / "m" / file)))
    assert all(torch.equal(written[k], v) for k, v in original.items())


def test_save_reads_each_state_dict_entry_once(tiny_state_dict, tmp_path):
    """A lazy mapping that makes tensors on access (the 20b stand-in builder uses one) is read once per name."""
    reads = []

    class CountingStateDict(dict):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)

        def items(self):
            return ((name, self[name]) for name in self.keys())

    save_mxfp4_checkpoint(CountingStateDict(tiny_state_dict), tiny_config(), str(tmp_path / "m"), 20_000)
    assert sorted(reads) == sorted(tiny_state_dict)


def test_save_refuses_blocks_without_their_scales(tiny_state_dict, tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    state_dict = {k: v for k, v in tiny_state_dict.items() if k != name}
    state_dict[f"{name}_blocks"] = torch.zeros(4, 64, 2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"{name}_blocks but not {name}_scales"):
        save_mxfp4_checkpoint(state_dict, tiny_config(), str(tmp_path / "m"))


def test_unchanged_expert_reexported_with_like_scales_is_byte_identical():
    """The exporter's case: experts loaded from MXFP4 into bf16, not changed, written back."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    blocks, scales, _ = random_blocks(4 * 128 * 2, seed=10)
    blocks, scales = blocks.reshape(4, 128, 2, 16), scales.reshape(4, 128, 2)
    param = dequantize_expert_weights(blocks, scales, torch.bfloat16)  # [E, H, 2I] = [4, 64, 128]
    again = quantize_expert_weights(name, param, like_scales=scales)
    assert torch.equal(again[f"{name}_blocks"], blocks) and torch.equal(again[f"{name}_scales"], scales)
    plain = quantize_expert_weights(name, param)
    assert not torch.equal(plain[f"{name}_blocks"], blocks)  # some blocks have a largest code below 4
    values = dequantize_expert_weights(plain[f"{name}_blocks"], plain[f"{name}_scales"])
    assert torch.equal(bits(values), bits(param))


def test_save_refuses_a_directory_that_already_holds_a_checkpoint(single_file_checkpoint, tiny_state_dict):
    with pytest.raises(FileExistsError, match="empty directory"):
        save_mxfp4_checkpoint(tiny_state_dict, tiny_config(), single_file_checkpoint)


# ---------------------------------------------------------------------------------------------- checker


def copy_checkpoint(src: str, dst) -> str:
    """Copy a single-file checkpoint directory so a test can break it."""
    os.makedirs(dst)
    for file in os.listdir(src):
        with open(os.path.join(src, file), "rb") as f_in, open(os.path.join(dst, file), "wb") as f_out:
            f_out.write(f_in.read())
    return str(dst)


def rewrite_weights(model_dir: str, edit) -> None:
    """Load model.safetensors, apply `edit(tensors)` in place, write it back."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_check_reports_a_missing_config(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    os.remove(os.path.join(model_dir, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_a_config_that_is_not_gpt_oss(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "model_type": "llama"}, f)
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama', expected 'gpt_oss'"):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_missing_weight_files(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_a_missing_expert_tensor(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    rewrite_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.experts.down_proj_scales"))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: expert tensor model\.layers\.1\.mlp\.experts\.down_proj_scales is missing",
    ):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_an_expert_tensor_of_the_wrong_shape(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    rewrite_weights(model_dir, lambda t: t.update({name: t[name][:, :64].contiguous()}))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: expert tensor {name} has shape \(4, 64, 2, 16\), "
        r"config\.json implies \(4, 128, 2, 16\)",
    ):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_an_expert_tensor_of_the_wrong_dtype(single_file_checkpoint, tmp_path):
    model_dir = copy_checkpoint(single_file_checkpoint, tmp_path / "m")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    rewrite_weights(model_dir, lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: expert tensor {name} has dtype BF16, MXFP4 needs uint8"
    ):
        check_mxfp4_checkpoint(model_dir)


def test_check_reports_blocks_and_scales_split_across_shards(sharded_checkpoint, tmp_path):
    model_dir = str(tmp_path / "m")
    os.makedirs(model_dir)
    tensors = {}
    for file in os.listdir(sharded_checkpoint):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(sharded_checkpoint, file)))
    moved = "model.layers.0.mlp.experts.gate_up_proj_scales"
    shards = {
        "a.safetensors": {k: v for k, v in tensors.items() if k != moved},
        "b.safetensors": {moved: tensors[moved]},
    }
    for file, part in shards.items():
        save_file(part, os.path.join(model_dir, file), metadata={"format": "pt"})
    weight_map = {k: file for file, part in shards.items() for k in part}
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with (
        open(os.path.join(sharded_checkpoint, "config.json")) as f_in,
        open(os.path.join(model_dir, "config.json"), "w") as f_out,
    ):
        f_out.write(f_in.read())
    with pytest.raises(
        CheckpointError,
        match=r"a\.safetensors: model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks and its _scales "
        r".* different shards",
    ):
        check_mxfp4_checkpoint(model_dir)


# ---------------------------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_codec_gives_the_same_bytes_and_values_on_cuda():
    torch.manual_seed(9)
    w = torch.randn(8, 64, 256) * torch.exp2(torch.randint(-20, 20, (8, 64, 1)).float())
    blocks, scales = quantize_mxfp4(w)
    gpu_blocks, gpu_scales = quantize_mxfp4(w.cuda())
    assert gpu_blocks.is_cuda and torch.equal(gpu_blocks.cpu(), blocks) and torch.equal(gpu_scales.cpu(), scales)
    for dtype in (torch.bfloat16, torch.float32):
        ours = dequantize_expert_weights(gpu_blocks, gpu_scales, dtype)
        assert ours.is_cuda
        assert torch.equal(bits(ours.cpu()), bits(dequantize_expert_weights(blocks, scales, dtype)))
        assert torch.equal(bits(ours), bits(convert_moe_packed_tensors(gpu_blocks, gpu_scales, dtype=dtype)))


def test_closest_scale_rule_keeps_unchanged_bytes_and_never_rounds_worse():
    """scale_rule='closest' (the export's rule for experts changed by LoRA): weights that came out of MXFP4
    unchanged give their bytes back; a block whose largest value an update lifts just past 6 x scale keeps its
    scale (the 'ceil' rule doubles it and coarsens all 32 values); no block rounds with a larger error."""
    torch.manual_seed(0)
    blocks, scales = quantize_mxfp4(torch.randn(64, 256) * 0.02)
    base = dequantize_mxfp4(blocks, scales, torch.float32)
    again = quantize_mxfp4(base, like_scales=scales, scale_rule="closest")
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)
    moved = base + torch.randn_like(base) * 1e-5
    row, block = torch.nonzero(base.reshape(64, 8, 32).abs().amax(-1) ==
                               6 * torch.ldexp(torch.ones(64, 8), scales.to(torch.int32) - 127))[0].tolist()
    top = block * 32 + base[row, block * 32:(block + 1) * 32].abs().argmax().item()
    moved[row, top] = base[row, top] * 1.01  # past 6 x scale: 'ceil' needs the next scale
    ceil = quantize_mxfp4(moved, like_scales=scales)
    closest = quantize_mxfp4(moved, like_scales=scales, scale_rule="closest")
    assert ceil[1][row, block] == scales[row, block] + 1 and closest[1][row, block] == scales[row, block]
    error = {rule: (dequantize_mxfp4(*q, torch.float32) - moved).reshape(-1, 32).square().sum(-1)
             for rule, q in (("ceil", ceil), ("closest", closest))}
    assert (error["closest"] <= error["ceil"]).all() and error["closest"].sum() < error["ceil"].sum() / 2
    with pytest.raises(ValueError, match="scale_rule"):
        quantize_mxfp4(moved, scale_rule="floor")
