"""MXFP4 helpers for gpt-oss expert weights: codec, checkpoint layout, writer and checker.

gpt-oss ships its MoE expert weights in MXFP4 (OCP microscaling FP4): blocks of 32 values that share
one power-of-two scale, each value an e2m1 code (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 = sign),
two codes a byte (low nibble = even element), scale byte = e8m0 exponent + 127. Everything else in
the checkpoint is bf16. Checkpoint names and shapes, per layer N:

    model.layers.N.mlp.experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]
    model.layers.N.mlp.experts.gate_up_proj_scales  uint8 [E, 2I, H/32]
    model.layers.N.mlp.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
    model.layers.N.mlp.experts.down_proj_scales     uint8 [E, H, I/32]

i.e. the transposed model parameter (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`), 32 values a
block along the input dim. Biases (`gate_up_proj_bias`, `down_proj_bias`) stay bf16.

Pure torch on whatever device the inputs live on: no Hub kernels, no `kernels` package, no triton.

Scale rule: scale = 2^ceil(log2(amax / 6)), amax = the block's largest magnitude. It never clips (every
value lands within the grid's +-6) and is the default of OpenAI's triton_kernels
(`downcast_to_mxfp_torch`, DequantScaleRoundingMode.ROUND_UP). Values then round to the nearest e2m1
grid point, ties to even (the OCP rule; triton_kernels rounds ties away from zero, so the two differ
only on values exactly halfway between grid points).

Re-quantising what came out of MXFP4:
- VALUES always come back exactly. A block dequantised from scale 2^e whose largest code magnitude
  is m gets the scale 2^(e+k), k = ceil(log2(m/6)) <= 0, and every code c <= m times 2^-k is again
  a grid point (k = -1 for m in {2, 3}, -2 for {1, 1.5}, -3 for {.5}).
- BYTES come back exactly only for blocks whose largest code magnitude is 4 or 6 (k = 0). A block
  whose largest magnitude is 3 (or 2, 1.5, 1, .5, or 0) gets a smaller scale and larger codes: same
  values, different bytes. To keep an unchanged expert byte-identical, pass the checkpoint's own
  scales as `like_scales` (each block's scale becomes max(own rule, like_scales): the original scale
  for unchanged blocks, and never a clip for changed ones), or copy the original `_blocks`/`_scales`
  tensors into the state dict given to `save_mxfp4_checkpoint`, which writes them through untouched.

Dequantisation mirrors transformers' `_convert_moe_packed_tensors` (integrations/mxfp4.py), which is
what `from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))` runs: the e2m1 lookup
table is built directly in the target dtype, codes are looked up, then `torch.ldexp` applies the
exponent in place in that dtype. Every MXFP4 value has at most two significant bits, so the result
is exact in bf16 and fp32 and both implementations agree bit for bit (tests/test_mxfp4.py checks it).
Loading on CPU always takes that path (without `kernels` + triton, transformers falls back to
dequantising). transformers 5.24 dequantises into the dtype asked of `from_pretrained`; 5.17
dequantises into bf16 whatever dtype was asked, leaving bf16 experts in an fp32 model.
"""

import json
import os
import re

import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------
BLOCK_SIZE = 32  # values sharing one scale (OCP MX block size)
SCALE_BIAS = 127  # e8m0 scale byte = exponent + 127
MIN_EXPONENT = -127  # scale byte 0; also the scale of all-zero blocks (as triton_kernels writes)
MAX_EXPONENT = 127  # scale byte 254; byte 255 is NaN in the OCP spec and never written
# e2m1 code -> value; codes 8..15 are the negatives (8 is -0.0). Same order as transformers' FP4_VALUES.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
CHUNK_BLOCKS = 1 << 18  # blocks converted at a time: bounds the temporaries to ~8 M values
EXPERT_PARAM_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # what `save_pretrained` uses ("5GB")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# ----------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A model directory is not a usable gpt-oss MXFP4 checkpoint; the message names file, tensor and fix."""


# ---------------------------------------------------------------------------------------------- codec


def derive_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Return ceil(log2(amax / 6)) as int32, clamped to [-127, 127]; -127 where amax == 0.

    Computed from frexp(amax) = m * 2^p (m in [0.5, 1)) rather than from a division:
    log2(amax / 6) = p - 3 + log2(m / 0.75) with log2(m / 0.75) in [-0.59, 0.42), so the ceiling is
    p - 3, plus one when m > 0.75. Exact for every float, subnormals included, so the power-of-two
    edge cases (amax = 3 * 2^k, 6 * 2^k) cannot be rounded the wrong way.
    """
    mantissa, exponent = torch.frexp(amax)
    exps = exponent.to(torch.int32) - 3 + (mantissa > 0.75).to(torch.int32)
    exps = torch.where(amax == 0, torch.full_like(exps, MIN_EXPONENT), exps)
    if bool((exps > MAX_EXPONENT).any()):
        raise ValueError(
            f"a block's largest magnitude ({amax.max().item():.3e}) exceeds MXFP4's range (6 * 2^127); "
            "rescale the weights before quantising"
        )
    return exps.clamp(min=MIN_EXPONENT)


def encode_e2m1(q: torch.Tensor) -> torch.Tensor:
    """Round values already divided by their block scale (|q| <= 6) to e2m1 codes, ties to even.

    The magnitude code counts the midpoints between neighbouring grid points that |q| lies above.
    At a midpoint, round-half-to-even means going up only when the upper neighbour has the even
    code: 0.75 -> 1 (code 2), 1.75 -> 2 (code 4) and 3.5 -> 4 (code 6) take `>=`, the other
    midpoints (0.25, 1.25, 2.5, 5) take `>`.
    The sign comes from signbit so that -0.0 keeps code 8 and round trips byte-exactly.
    """
    mag = q.abs()
    code = (
        (mag > 0.25).to(torch.uint8)
        + (mag >= 0.75)
        + (mag > 1.25)
        + (mag >= 1.75)
        + (mag > 2.5)
        + (mag >= 3.5)
        + (mag > 5.0)
    )
    return code | (torch.signbit(q).to(torch.uint8) << 3)


def quantize_mxfp4(
    w: torch.Tensor, like_scales: torch.Tensor | None = None, scale_rule: str = "ceil"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` [..., n] along its last dim into MXFP4 blocks uint8 [..., n/32, 16] and scales uint8 [..., n/32].

    Scale per block: 2^ceil(log2(amax / 6)) (see the module docstring); all-zero blocks get scale
    byte 0. With `like_scales` (uint8 [..., n/32], e.g. the scales of the checkpoint the weights came
    from) each block uses the larger of its own scale and the given one: weights that came out of
    those blocks/scales unchanged then reproduce the original bytes exactly, changed weights are
    never clipped. Inputs are computed in fp32 (float64 stays float64); NaN/inf are refused.

    scale_rule='closest': each block takes that scale or half of it, whichever rounds the block with the smaller
    squared error (half the scale clips values beyond 6 x scale / 2 to it; ties keep the larger scale, so unchanged
    blocks still give their bytes back). For weights that came out of MXFP4 and moved a little (a merged LoRA
    update), an update that lifts a block's largest value just past 6 x scale would otherwise double the scale and
    coarsen all 32 values; benchmarks/bench_export_rounding.py measures the difference.
    """
    if scale_rule not in ("ceil", "closest"):
        raise ValueError(f"scale_rule must be 'ceil' or 'closest', got {scale_rule!r}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_mxfp4 needs a floating-point tensor, got {w.dtype}")
    if w.ndim < 1 or w.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"quantize_mxfp4 quantises the last dim in blocks of {BLOCK_SIZE}: shape {tuple(w.shape)} "
            f"has last dim not a multiple of {BLOCK_SIZE}"
        )
    lead, n = tuple(w.shape[:-1]), w.shape[-1]
    if like_scales is not None:
        expected = (*lead, n // BLOCK_SIZE)
        assert like_scales.dtype == torch.uint8 and tuple(like_scales.shape) == expected, (
            f"like_scales must be uint8 {expected}, got {like_scales.dtype} {tuple(like_scales.shape)}"
        )
    work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.reshape(-1, BLOCK_SIZE)
    like_rows = None if like_scales is None else like_scales.reshape(-1).to(w.device)
    blocks = torch.empty(rows.shape[0], BLOCK_SIZE // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows.shape[0], dtype=torch.uint8, device=w.device)
    for r0 in range(0, rows.shape[0], CHUNK_BLOCKS):
        r1 = min(r0 + CHUNK_BLOCKS, rows.shape[0])
        x = rows[r0:r1].to(work_dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_mxfp4 got NaN or inf values; MXFP4 cannot store them")
        exps = derive_exponents(x.abs().amax(dim=-1))
        if like_rows is not None:
            exps = torch.maximum(exps, like_rows[r0:r1].to(torch.int32) - SCALE_BIAS)
        # Multiplying by a power of two is exact, so the rounding below sees the true ratio.
        codes = encode_e2m1(torch.ldexp(x, -exps.unsqueeze(-1)))
        if scale_rule == "closest":
            codes, exps = closer_of_two_scales(x, codes, exps)
        blocks[r0:r1] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales[r0:r1] = (exps + SCALE_BIAS).to(torch.uint8)
    blocks = blocks.reshape(*lead, n // BLOCK_SIZE, BLOCK_SIZE // 2)
    scales = scales.reshape(*lead, n // BLOCK_SIZE)
    assert blocks.shape[:-1] == scales.shape, f"{blocks.shape=} {scales.shape=}"
    return blocks, scales


def closer_of_two_scales(x: torch.Tensor, codes: torch.Tensor, exps: torch.Tensor):
    """(codes, exps) of blocks x [rows, 32] rounded with exponent exps or exps - 1 (clipping at 6), per row the one
    with the smaller squared error (ties keep exps)."""
    lut = torch.tensor(E2M1_VALUES, dtype=x.dtype, device=x.device)
    finer = (exps - 1).clamp(min=MIN_EXPONENT)
    finer_codes = encode_e2m1(torch.ldexp(x, -finer.unsqueeze(-1)).clamp(-6.0, 6.0))

    def error(c, e):
        return (torch.ldexp(lut[c.long()], e.unsqueeze(-1)) - x).square().sum(dim=-1)

    use_finer = error(finer_codes, finer) < error(codes, exps)
    return torch.where(use_finer.unsqueeze(-1), finer_codes, codes), torch.where(use_finer, finer, exps)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode MXFP4 blocks uint8 [..., G, 16] and scales uint8 [..., G] into `dtype` [..., G*32].

    Same operations as transformers' `_convert_moe_packed_tensors`: look the codes up in a table
    held in `dtype`, then `torch.ldexp` by (scale - 127) in place in `dtype`, so both agree bit for bit
    (scale byte 255 gives inf/nan there and here alike).
    """
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8, (
        f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
    )
    assert blocks.ndim >= 2 and blocks.shape[-1] == BLOCK_SIZE // 2, (
        f"MXFP4 blocks must end in a dim of {BLOCK_SIZE // 2} bytes, got shape {tuple(blocks.shape)}"
    )
    assert blocks.shape[:-1] == scales.shape, (
        f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up"
    )
    lead = tuple(scales.shape)
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=blocks.device)
    rows = blocks.reshape(-1, BLOCK_SIZE // 2)
    exps = scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS
    out = torch.empty(rows.shape[0], BLOCK_SIZE, dtype=dtype, device=blocks.device)
    for r0 in range(0, rows.shape[0], CHUNK_BLOCKS):
        r1 = min(r0 + CHUNK_BLOCKS, rows.shape[0])
        sub = out[r0:r1]
        sub[:, 0::2] = lut[(rows[r0:r1] & 0x0F).to(torch.int)]
        sub[:, 1::2] = lut[(rows[r0:r1] >> 4).to(torch.int)]
        torch.ldexp(sub, exps[r0:r1], out=sub)
    return out.reshape(*lead[:-1], lead[-1] * BLOCK_SIZE)


# ---------------------------------------------------------------------------------------------- layout


def split_expert_name(name: str) -> tuple[str, str]:
    """Split `model.layers.N.mlp.experts.gate_up_proj` into (`...mlp.experts`, `gate_up_proj`); ValueError otherwise."""
    match = EXPERT_PARAM_RE.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a gpt-oss expert weight; expected '<prefix>.mlp.experts.gate_up_proj' "
            "or '<prefix>.mlp.experts.down_proj'"
        )
    return match["prefix"], match["proj"]


def quantize_expert_weights(
    name: str, param: torch.Tensor, like_scales: torch.Tensor | None = None, scale_rule: str = "ceil"
) -> dict[str, torch.Tensor]:
    """Turn the model parameter `name` ([E, in, out]) into its checkpoint tensors `{name}_blocks`, `{name}_scales`.

    `gate_up_proj [E, H, 2I]` -> blocks uint8 [E, 2I, H/32, 16], scales uint8 [E, 2I, H/32];
    `down_proj [E, I, H]` -> blocks [E, H, I/32, 16], scales [E, H, I/32]. The checkpoint holds the
    transposed weight, so blocks run along the input dim. `like_scales` (uint8 [E, out, in/32]): see
    `quantize_mxfp4`, as `scale_rule`. Quantised one expert at a time to keep the fp32 temporaries small.
    """
    split_expert_name(name)
    assert param.ndim == 3, f"{name}: expected a 3-D expert weight [E, in, out], got shape {tuple(param.shape)}"
    num_experts, dim_in, dim_out = param.shape
    assert dim_in % BLOCK_SIZE == 0, (
        f"{name}: input dim {dim_in} (shape {tuple(param.shape)}) is not a multiple of {BLOCK_SIZE}; "
        "MXFP4 needs hidden_size and intermediate_size to be multiples of 32"
    )
    blocks = torch.empty(
        num_experts, dim_out, dim_in // BLOCK_SIZE, BLOCK_SIZE // 2, dtype=torch.uint8, device=param.device
    )
    scales = torch.empty(num_experts, dim_out, dim_in // BLOCK_SIZE, dtype=torch.uint8, device=param.device)
    if like_scales is not None:
        assert tuple(like_scales.shape) == tuple(scales.shape), (
            f"{name}: like_scales shape {tuple(like_scales.shape)} != expected {tuple(scales.shape)}"
        )
    for e in range(num_experts):
        like = None if like_scales is None else like_scales[e]
        blocks[e], scales[e] = quantize_mxfp4(param[e].detach().transpose(0, 1), like_scales=like,
                                              scale_rule=scale_rule)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def dequantize_expert_weights(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize_expert_weights`: blocks [E, out, in/32, 16], scales [E, out, in/32] -> [E, in, out].

    Same transpose as transformers (`out.transpose(1, 2).contiguous()`), so the result is laid out
    like the model parameter it loads into.
    """
    assert blocks.ndim == 4 and scales.ndim == 3, (
        f"expert blocks must be 4-D [E, out, in/32, 16] and scales 3-D [E, out, in/32], "
        f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
    )
    return dequantize_mxfp4(blocks, scales, dtype=dtype).transpose(1, 2).contiguous()


def mxfp4_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of a gpt-oss state dict with every expert weight replaced by its `_blocks` / `_scales` pair.

    Everything else (biases `gate_up_proj_bias` / `down_proj_bias`, attention, router, norms,
    embeddings) is passed through as is, in the original order. Holds every quantised layer at once:
    for a full-size model prefer `save_mxfp4_checkpoint`, which quantises one shard at a time.
    """
    out = {}
    for name, tensor in state_dict.items():
        if EXPERT_PARAM_RE.match(name):
            out.update(quantize_expert_weights(name, tensor))
        else:
            out[name] = tensor
    return out


def mxfp4_quantization_config(num_layers: int | None = None) -> dict:
    """Return the `quantization_config` entry of a gpt-oss MXFP4 `config.json`.

    By default exactly what openai/gpt-oss-20b and -120b ship: wildcard patterns
    `model.layers.*.self_attn` and `model.layers.*.mlp.router` (transformers matches entries as
    regexes at module boundaries). With `num_layers`, those two are spelled out per layer
    (`model.layers.0.self_attn`, ...) for tools that compare module names literally.
    """
    if num_layers is None:
        per_layer = ["model.layers.*.self_attn", "model.layers.*.mlp.router"]
    else:
        assert num_layers > 0, f"num_layers must be positive, got {num_layers}"
        per_layer = [f"model.layers.{i}.self_attn" for i in range(num_layers)]
        per_layer += [f"model.layers.{i}.mlp.router" for i in range(num_layers)]
    return {"quant_method": "mxfp4", "modules_to_not_convert": [*per_layer, "model.embed_tokens", "lm_head"]}


# ---------------------------------------------------------------------------------------------- writer


def group_checkpoint_units(names: list[str]) -> list[list[str]]:
    """Group state-dict names, in order, into units that must land in the same shard.

    An already-quantised `_blocks` / `_scales` pair is one unit (blocks first), so the pair can
    never straddle shards; every other name, expert weights included (they become their pair when
    converted), is a unit of its own. Looks at names only, so lazy state dicts are not touched.
    """
    present = set(names)
    units = []
    for name in names:
        base, _, suffix = name.rpartition("_")
        if suffix not in ("blocks", "scales") or not EXPERT_PARAM_RE.match(base):
            units.append([name])
            continue
        missing = [f"{base}_{s}" for s in ("blocks", "scales") if f"{base}_{s}" not in present]
        if missing:
            raise ValueError(f"state dict has {name} but not {missing[0]}; MXFP4 blocks and scales come in pairs")
        if suffix == "blocks":
            units.append([name, f"{base}_scales"])
    return units


def convert_for_checkpoint(name: str, tensor: torch.Tensor, experts_format: str = "mxfp4") -> dict[str, torch.Tensor]:
    """Return the checkpoint tensor(s) for one state-dict entry: MXFP4 for expert weights (bf16 with
    experts_format="bf16"), bf16 for other floats."""
    if EXPERT_PARAM_RE.match(name) and experts_format == "mxfp4":
        return {k: v.cpu() for k, v in quantize_expert_weights(name, tensor).items()}
    if tensor.dtype == torch.uint8 or not tensor.is_floating_point():
        return {name: tensor.detach().cpu().contiguous()}
    return {name: tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()}


def build_checkpoint_config(config, experts_format: str = "mxfp4") -> dict:
    """Return the `config.json` dict for a checkpoint with MXFP4 (or bf16) experts from a GptOssConfig or a dict."""
    config_dict = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    if config_dict.get("model_type") != "gpt_oss":
        raise ValueError(
            f"save_checkpoint needs a gpt-oss config, got model_type={config_dict.get('model_type')!r}"
        )
    if experts_format == "mxfp4":
        config_dict["quantization_config"] = mxfp4_quantization_config()
    else:
        config_dict.pop("quantization_config", None)  # plain bf16 experts: nothing to dequantise
    config_dict["architectures"] = config_dict.get("architectures") or ["GptOssForCausalLM"]
    # The non-expert tensors are written in bf16, so loading with dtype="auto" gives bf16 like the real model.
    config_dict["dtype"] = "bfloat16"
    if "torch_dtype" in config_dict:
        config_dict["torch_dtype"] = "bfloat16"
    return config_dict


def save_mxfp4_checkpoint(
    state_dict: dict[str, torch.Tensor], config, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write a gpt-oss state dict as an MXFP4 checkpoint into `out_dir` (save_checkpoint); return the file names."""
    return save_checkpoint(state_dict, config, out_dir, max_shard_bytes, experts_format="mxfp4")


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], config, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    experts_format: str = "mxfp4",
) -> list[str]:
    """Write a gpt-oss state dict as a checkpoint into `out_dir`; return the weight file names.

    experts_format="bf16" writes the expert weights as they are named in the model (`gate_up_proj`,
    `down_proj`), in bf16, and a config.json without quantization_config: a plain gpt-oss checkpoint,
    written here rather than by `save_pretrained` (transformers 5.17 saves a model whose MXFP4 experts
    were dequantised on load under the literal names `gate_up_proj$` / `down_proj$`, which no reader
    finds). What follows describes the default, MXFP4.

    Expert weights (`...mlp.experts.gate_up_proj` / `down_proj`, any float dtype, any device) are
    quantised with `quantize_expert_weights`; `_blocks` / `_scales` pairs already in the state dict
    (e.g. the original bytes of experts that were not changed) are written through untouched; every
    other floating tensor is written in bf16, like the real checkpoint. `config` (GptOssConfig or
    dict) goes to `config.json` with the mxfp4 `quantization_config`; `model.safetensors.index.json`
    is written when there is more than one shard. Each expert's `_blocks` and `_scales` sit in the
    same shard, `_blocks` first in file order (safetensors orders a file's tensors by dtype, then
    name), as llama.cpp's converter expects.

    Memory: each state-dict entry is read once, converted, and kept only until its shard is written,
    so peak memory is about one shard (`max_shard_bytes`) beyond the input; a lazy mapping that makes
    tensors on access works. Shards are written under temporary names and renamed at the end, when
    their count is known.

    Not atomic: it writes straight into `out_dir`, which must not hold a checkpoint already. To
    publish atomically, write into a temporary directory next to the destination, run
    `check_mxfp4_checkpoint` on it, then rename it into place.
    """
    os.makedirs(out_dir, exist_ok=True)
    stale = [f for f in os.listdir(out_dir) if f.endswith(".safetensors") or f in (INDEX_FILE, CONFIG_FILE)]
    if stale:
        raise FileExistsError(f"{out_dir} already holds {sorted(stale)}; write the checkpoint into an empty directory")
    if experts_format not in ("mxfp4", "bf16"):
        raise ValueError(f"experts_format must be 'mxfp4' or 'bf16', got {experts_format!r}")
    config_dict = build_checkpoint_config(config, experts_format)
    shards, current, current_bytes = [], {}, 0  # shards: [(temporary file name, tensor names, tensor bytes)]

    def flush(tensors: dict[str, torch.Tensor], nbytes: int) -> None:
        partial = f"partial-{len(shards):05d}.safetensors.tmp"
        save_file(tensors, os.path.join(out_dir, partial), metadata={"format": "pt"})
        shards.append((partial, list(tensors), nbytes))

    for unit in group_checkpoint_units(list(state_dict.keys())):
        tensors = {}
        for name in unit:
            tensors.update(convert_for_checkpoint(name, state_dict[name], experts_format))
        unit_bytes = sum(t.nbytes for t in tensors.values())
        if current and current_bytes + unit_bytes > max_shard_bytes:
            flush(current, current_bytes)
            current, current_bytes = {}, 0
        current.update(tensors)
        current_bytes += unit_bytes
    if current or not shards:
        flush(current, current_bytes)
    del current

    if len(shards) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, (partial, names, _) in zip(files, shards, strict=True):
        os.replace(os.path.join(out_dir, partial), os.path.join(out_dir, file))
        weight_map.update(dict.fromkeys(names, file))
    if len(files) > 1:
        total_size = sum(nbytes for _, _, nbytes in shards)  # tensor bytes, as save_pretrained counts
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    return files


# ---------------------------------------------------------------------------------------------- checker


def read_safetensors_header(path: str) -> dict[str, dict]:
    """Return a safetensors file's header, `{name: {"dtype", "shape", "data_offsets"}}`, in file order.

    Parses only the 8-byte length and the JSON header, no tensor data; unlike `safe_open` this
    also yields `data_offsets`, which is what "file order" means to consumers reading the file.
    A file shorter than its header says (cut off by an interrupted copy or write) is a CheckpointError.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < size <= 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length); copy or write it again")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err}); copy or write it again") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object); copy or write it again")
    header.pop("__metadata__", None)
    try:
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header (bad data_offsets); copy or write it "
                              "again") from err
    if os.path.getsize(path) < 8 + size + data_end:
        raise CheckpointError(f"{path}: truncated: its header describes {8 + size + data_end} bytes, the file has "
                              f"{os.path.getsize(path)} (an interrupted copy or write?); copy or write it again")
    return header


def check_weight_files(model_dir: str) -> None:
    """Raise CheckpointError naming the file when a model directory's weights cannot be read: an index that is not
    JSON or names a shard that is missing, a safetensors file whose header is unreadable or that is shorter than its
    header says. Reads the index and the headers only; a directory with no weight file passes (the loader says what
    it lacks)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index_path}: corrupt, not a readable safetensors index ({type(err).__name__}: "
                                  f"{err}); copy the model directory again") from None
        for file in files:
            if not os.path.isfile(os.path.join(model_dir, file)):
                raise CheckpointError(f"{os.path.join(model_dir, file)}: shard named in {index_path} is missing; "
                                      "copy the model directory again")
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for file in files:
        read_safetensors_header(os.path.join(model_dir, file))


def check_expert_tensor(file: str, name: str, entry: dict, shape: tuple[int, ...]) -> None:
    """Raise CheckpointError unless the header `entry` for `name` in `file` is uint8 of `shape`."""
    if entry["dtype"] != "U8":
        raise CheckpointError(
            f"{file}: expert tensor {name} has dtype {entry['dtype']}, MXFP4 needs uint8 (U8); "
            "re-export with mxfp4.save_mxfp4_checkpoint"
        )
    if tuple(entry["shape"]) != shape:
        raise CheckpointError(
            f"{file}: expert tensor {name} has shape {tuple(entry['shape'])}, config.json implies {shape}; "
            "re-export with mxfp4.save_mxfp4_checkpoint or fix config.json"
        )


def check_mxfp4_checkpoint(model_dir: str) -> None:
    """Validate a gpt-oss MXFP4 model directory; raise CheckpointError naming file, tensor and fix.

    Checks: config.json present, model_type "gpt_oss", an mxfp4 quantization_config, hidden and
    intermediate sizes multiples of 32; safetensors file(s) present (single file or index + every
    shard it names); for every layer, both experts' `_blocks` / `_scales` present, uint8, shaped
    from num_local_experts / hidden_size / intermediate_size, each pair in one shard with `_blocks`
    first. Reads only the safetensors headers.
    """
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{config_path}: missing; a checkpoint needs its config.json (save_mxfp4_checkpoint writes it)"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}); rewrite it") from err
    if config.get("model_type") != "gpt_oss":
        raise CheckpointError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'gpt_oss'; "
            "this is not a gpt-oss checkpoint"
        )
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "mxfp4":
        raise CheckpointError(
            f"{config_path}: quantization_config.quant_method is {quant.get('quant_method')!r}, expected 'mxfp4'; "
            "add mxfp4.mxfp4_quantization_config() under 'quantization_config'"
        )
    try:
        num_layers, num_experts = int(config["num_hidden_layers"]), int(config["num_local_experts"])
        hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
    except KeyError as err:
        raise CheckpointError(f"{config_path}: missing {err.args[0]!r}; write the full GptOssConfig") from err
    for key, value in (("hidden_size", hidden), ("intermediate_size", intermediate)):
        if value % BLOCK_SIZE:
            raise CheckpointError(f"{config_path}: {key}={value} is not a multiple of {BLOCK_SIZE}, which MXFP4 needs")

    check_weight_files(model_dir)
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}; the weights were not written (re-export)"
        )
    location = {}  # tensor name -> (file path, header entry)
    for file in files:
        path = os.path.join(model_dir, file)
        for name, entry in read_safetensors_header(path).items():
            location[name] = (path, entry)

    for layer in range(num_layers):
        for proj, dim_out, dim_in in (("gate_up_proj", 2 * intermediate, hidden), ("down_proj", hidden, intermediate)):
            base = f"model.layers.{layer}.mlp.experts.{proj}"
            expected = {
                f"{base}_blocks": (num_experts, dim_out, dim_in // BLOCK_SIZE, BLOCK_SIZE // 2),
                f"{base}_scales": (num_experts, dim_out, dim_in // BLOCK_SIZE),
            }
            for name, shape in expected.items():
                if name not in location:
                    if weight_map is None:
                        where = os.path.join(model_dir, SINGLE_FILE)
                    else:
                        where = os.path.join(model_dir, weight_map[name]) if name in weight_map else index_path
                    raise CheckpointError(
                        f"{where}: expert tensor {name} is missing; re-export with mxfp4.save_mxfp4_checkpoint"
                    )
                path, entry = location[name]
                if weight_map is not None and os.path.join(model_dir, weight_map.get(name, "")) != path:
                    raise CheckpointError(
                        f"{index_path}: lists {name} under {weight_map.get(name)!r}, but it is in {path}; "
                        "rewrite the index"
                    )
                check_expert_tensor(path, name, entry, shape)
            (blocks_path, blocks), (scales_path, scales) = (location[name] for name in expected)
            if blocks_path != scales_path:
                raise CheckpointError(
                    f"{blocks_path}: {base}_blocks and its _scales (in {scales_path}) are in different shards; "
                    "consumers such as llama.cpp's converter mis-pair them. "
                    "Re-export with mxfp4.save_mxfp4_checkpoint"
                )
            if blocks["data_offsets"][0] > scales["data_offsets"][0]:
                raise CheckpointError(
                    f"{blocks_path}: {base}_scales comes before {base}_blocks in file order; consumers read "
                    "blocks first. Re-export with mxfp4.save_mxfp4_checkpoint"
                )
