"""Merge a LoRA adapter into gpt-oss and bring its experts back to MXFP4: what export_quantized_model.py writes and
test_lora_adapter_quantized.py evaluates.

gpt-oss ships its MoE experts as MXFP4 blocks/scales; model_loader dequantises them exactly. After
`merge_and_unload`, an attention-only adapter has left every expert weight untouched, so the export copies the
base checkpoint's `_blocks` / `_scales` through byte for byte. Expert LoRA (`target_parameters`) changes the
experts; they are quantised again with the base checkpoint's own scales as `like_scales` and the 'closest' scale
rule (gpu_engine/mxfp4.py: a block keeps its original scale unless the update needs a larger one, or half of that when
it rounds closer, clipping the few values past it), which loses whatever part of the update falls below half an MXFP4
step: `expert_quantization_error` measures how much.

- `CheckpointReader`: the tensors of a safetensors model directory by name, read lazily (one at a time);
- `lora_expert_parameters(peft_model)`: names of the expert weights an adapter changes (before merging);
- `quantize_experts(model, changed, reader)`: name -> MXFP4 tensors for every expert weight of a merged model;
- `load_quantized_experts(model, packed)`: put those MXFP4 values into the model (what a reader of the export gets);
- `expert_quantization_error(model, packed, reader)`: relative error of the weights and of the LoRA update;
- `export_state_dict(model, packed)`: the lazily-built state dict handed to mxfp4.save_mxfp4_checkpoint;
- `prompt_logits` / `compare_logits`: the forward-pass check of a merged or exported model;
- `add_converter_config_keys`: config.json keys that the original checkpoint carries and llama.cpp/Ollama read.
"""

import json
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft.tuners.lora.layer import ParamWrapper
from safetensors import safe_open

import model_loader
from gpu_engine.mxfp4 import (EXPERT_PARAM_RE, INDEX_FILE, SINGLE_FILE, dequantize_expert_weights,
                              quantize_expert_weights)


class CheckpointReader:
    """Tensors of a safetensors model directory by name, each read from disk when asked for."""

    def __init__(self, model_dir):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.model_dir / SINGLE_FILE).is_file():
            with safe_open(str(self.model_dir / SINGLE_FILE), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors model")

    def names(self):
        return list(self.weight_map)

    def __contains__(self, name):
        return name in self.weight_map

    def get(self, name):
        with safe_open(str(self.model_dir / self.weight_map[name]), "pt") as f:
            return f.get_tensor(name)


def local_checkpoint_dir(model_id):
    """A model id as a local directory: 'tiny' and directories as they are, a Hub id through the Hub cache."""
    path = model_loader.resolve_model_id(model_id)
    if os.path.isdir(path):
        return Path(path)

    return Path(snapshot_download(path, allow_patterns=["*.json", "model*.safetensors", "*.jinja", "LICENSE",
                                                        "USAGE_POLICY"]))


def lora_expert_parameters(peft_model):
    """Full names (`model.layers.N.mlp.experts.gate_up_proj`) of the expert weights the adapter's LoRA changes."""
    names = set()
    for module_name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            prefix = module_name.removeprefix("base_model.model.")
            while prefix.endswith(".base_layer"):  # ParamWrappers nest, one per wrapped parameter
                prefix = prefix.removesuffix(".base_layer")
            names.add(f"{prefix}.{module.parameter_name}")
    return sorted(names)


def expert_weights(model):
    """Checkpoint name (`model.layers.N.mlp.experts.gate_up_proj`) -> parameter, for every expert weight.

    Works on a plain model and on a PeftModel, whose expert LoRA nests the parameter under `base_layer`s.
    """
    weights = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if EXPERT_PARAM_RE.match(name):
            weights[name] = param
    return weights


class LazyStateDict(dict):
    """name -> tensor made on access (a dict of zero-argument callables underneath, so keys() and len() work)."""

    def __getitem__(self, name):
        return super().__getitem__(name)()

    def items(self):
        return ((name, self[name]) for name in self.keys())

    def values(self):
        return (self[name] for name in self.keys())


def quantize_experts(model, changed, reader):
    """{f"{name}_blocks": uint8, f"{name}_scales": uint8} for every expert weight of a merged model.

    Expert weights not in `changed` are the base checkpoint's own bytes (they came out of them unchanged), read from
    disk only when asked for; changed ones are quantised where they live (GPU or CPU) with the checkpoint's scales as
    like_scales and kept on the CPU (~0.53 byte a weight). A base checkpoint without MXFP4 experts (plain bf16) gets
    every expert quantised afresh.
    """
    packed = LazyStateDict()
    for name, param in expert_weights(model).items():
        blocks, scales = f"{name}_blocks", f"{name}_scales"
        if name not in changed and blocks in reader:
            packed[blocks], packed[scales] = (lambda key=blocks: reader.get(key)), (lambda key=scales: reader.get(key))
            continue
        like = reader.get(scales).to(param.device) if scales in reader else None
        quantized = quantize_expert_weights(name, param, like_scales=like, scale_rule="closest")
        for key in (blocks, scales):
            packed[key] = (lambda tensor=quantized[key].cpu(): tensor)
    return packed


def load_quantized_experts(model, packed, names=None):
    """Replace expert weights (all, or those in `names`) by the MXFP4 values in `packed`, in place."""
    with torch.no_grad():
        for name, param in expert_weights(model).items():
            if names is None or name in names:
                values = dequantize_expert_weights(packed[f"{name}_blocks"].to(param.device),
                                                   packed[f"{name}_scales"].to(param.device), dtype=param.dtype)
                param.copy_(values)


def expert_quantization_error(model, packed, reader, names):
    """How much MXFP4 changes the merged experts in `names` (call before load_quantized_experts).

    Per weight: `weight` = |Q(W) - W| / |W| (Frobenius), `update` = |Q(W) - W| / |W - W_base|, the share of the
    LoRA update lost to rounding (0 = kept exactly, 1 = an error as large as the update itself).
    """
    rows = []
    with torch.no_grad():
        for name, param in expert_weights(model).items():
            if name not in names:
                continue
            w = param.detach().float()
            q = dequantize_expert_weights(packed[f"{name}_blocks"].to(param.device),
                                          packed[f"{name}_scales"].to(param.device), dtype=torch.float32)
            error = (q - w).norm().item()
            row = {"name": name, "weight_relative_error": error / max(w.norm().item(), 1e-30)}
            if f"{name}_blocks" in reader:
                base = dequantize_expert_weights(reader.get(f"{name}_blocks").to(param.device),
                                                 reader.get(f"{name}_scales").to(param.device), dtype=torch.float32)
                update = (w - base).norm().item()
                row["update_relative_error"] = error / update if update > 0 else None
            rows.append(row)
    if not rows:
        return None
    updates = [r["update_relative_error"] for r in rows if r.get("update_relative_error") is not None]
    mean_update_error = sum(updates) / len(updates) if updates else None
    return {"weights": len(rows),
            "weight_relative_error_max": max(r["weight_relative_error"] for r in rows),
            "weight_relative_error_mean": sum(r["weight_relative_error"] for r in rows) / len(rows),
            "update_relative_error_max": max(updates) if updates else None,
            "update_relative_error_mean": mean_update_error,
            # the share of the update kept: 1 - its mean relative rounding error, at least 0
            "update_kept": None if mean_update_error is None else max(0.0, 1.0 - mean_update_error),
            "per_weight": rows}


def export_state_dict(model, packed):
    """The checkpoint's tensors in the model's order: expert weights as their `packed` MXFP4 pairs, the rest as is.

    Tensors stay where they are until the writer asks for one, so only the shard being written is copied to the CPU.
    """
    params = model.state_dict()
    sources = {}
    for name in params:
        if EXPERT_PARAM_RE.match(name):
            for suffix in ("_blocks", "_scales"):
                sources[name + suffix] = (lambda key=name + suffix: packed[key])
        else:
            sources[name] = (lambda key=name: params[key])
    return LazyStateDict(sources)


def add_converter_config_keys(config_dict):
    """Add the config.json keys openai/gpt-oss-20b carries and llama.cpp / Ollama read, where missing.

    A config written by transformers 5 holds `rope_parameters` and `num_experts_per_tok` only; the converters read
    `experts_per_token`, `rope_theta`, `rope_scaling` and `initial_context_length`. transformers reads both forms
    alike (the exporter's reload check runs on the result).
    """
    config = dict(config_dict)
    config.setdefault("experts_per_token", config.get("num_experts_per_tok"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type") == "yarn":
        config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        config.setdefault("initial_context_length", rope.get("original_max_position_embeddings"))
    return config


def prompt_logits(model, tokenizer, prompts, positions=None):
    """Float32 CPU logits [tokens, vocab] of each prompt (its last `positions` tokens), one forward pass each."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            logits = model(input_ids=ids).logits[0]
            out.append(logits[-positions:].float().cpu() if positions else logits.float().cpu())
    return out


def compare_logits(reference, other):
    """Largest absolute logit difference, the same relative to the largest reference logit, and argmax agreement."""
    diff = max((a - b).abs().max().item() for a, b in zip(reference, other))
    scale = max(a.abs().max().item() for a in reference)
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(reference, other))
    total = sum(a.shape[0] for a in reference)
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-30), "argmax_agreement": agree / total,
            "positions": total}
