"""The one way this project loads gpt-oss: MXFP4 checkpoint -> dequantised weights, eager attention.

Every script loads through `load_model` / `load_tokenizer` so that they all agree on:
- MXFP4 experts dequantised on load (transformers' `Mxfp4Config(dequantize=True)`, plain torch, no Hub kernels):
  bf16 on a GPU, fp32 on a CPU (CPUs have no fast bf16 matmul and fp32 keeps the tiny stand-in exact);
- eager attention: gpt-oss has learnable attention sinks and FlashAttention has no backward for them
  (Dao-AILab/flash-attention#1797), so training through FA2/FA3 would give wrong gradients; gpt-oss has no SDPA path;
- the experts implementation: `grouped_mm` on a GPU (one grouped GEMM for all experts, measured fastest),
  `eager` on a CPU (a loop over the few experts a tiny model has; grouped_mm has no fast CPU kernel);
- a clear error instead of an out-of-memory crawl when a 20b-sized model is asked for on a machine without a GPU.

MODEL_ID anywhere in the project may be a Hub id (`openai/gpt-oss-20b`), a local model directory, or `tiny`
(the embedded stand-in, built on first use under runs/, see tiny_gpt_oss.py).
"""

import os

import torch

TINY = "tiny"
# Above this many parameters a model is not something to run on a CPU here (the tiny stand-in has ~10^5).
MAX_CPU_PARAMETERS = 2_000_000_000


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as asked; the message says which setting to change."""


def resolve_model_id(model_id):
    """'tiny' -> the embedded stand-in's directory (built if needed); anything else is returned unchanged."""
    if model_id == TINY:
        from tiny_gpt_oss import ensure_tiny_model

        return str(ensure_tiny_model())
    return model_id


def count_parameters(config):
    """Parameter count of a gpt-oss config, computed from its shape (no weights needed)."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q + q + 2 * (h * kv + kv) + q * h + h + config.num_attention_heads
    experts = e * (h * 2 * i + 2 * i + i * h + h) + e * h + e
    per_layer = attention + experts + 2 * h
    return config.num_hidden_layers * per_layer + 2 * config.vocab_size * h + h


def load_config(model_id):
    """AutoConfig for a gpt-oss model, with errors that say what to do."""
    from transformers import AutoConfig

    if os.path.isdir(model_id) and not os.path.isfile(os.path.join(model_id, "config.json")):
        raise ModelLoadError(f"{model_id}: no config.json in this directory; is it a complete model directory?")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except OSError as error:
        raise ModelLoadError(
            f"could not load the config of {model_id!r} ({error.__class__.__name__}). A Hub id needs network access "
            "to the Hugging Face Hub (and HF_TOKEN for private repos); without it use a local model directory or "
            "--tiny for the embedded stand-in."
        ) from error
    if config.model_type != "gpt_oss":
        raise ModelLoadError(
            f"{model_id}: config.json has model_type {config.model_type!r}, expected 'gpt_oss'; this project "
            "trains gpt-oss models only."
        )
    return config


def pick_device(device=None):
    """'cuda' when a GPU is present, else 'cpu' (or the device asked for)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_id, device=None, dtype=None, experts_implementation=None):
    """Load a gpt-oss model for training or inference: MXFP4 experts dequantised, eager attention.

    Returns the model on `device` ('cuda' when available, else 'cpu') in `dtype` (bf16 on GPU, fp32 on CPU).
    """
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model_id = resolve_model_id(model_id)
    config = load_config(model_id)
    device = pick_device(device)
    n_params = count_parameters(config)
    if device == "cpu" and n_params > MAX_CPU_PARAMETERS:
        raise ModelLoadError(
            f"{model_id} has {n_params / 1e9:.1f} B parameters and this machine has no CUDA GPU: it needs about "
            f"{2 * n_params / 2**30:.0f} GiB of GPU memory in bf16. Run on a GPU machine, or use --tiny "
            "(the embedded stand-in) to run the same code on a CPU."
        )
    if os.path.isdir(model_id):
        from mxfp4 import check_mxfp4_checkpoint

        if getattr(config, "quantization_config", None):
            check_mxfp4_checkpoint(model_id)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    experts_implementation = experts_implementation or ("grouped_mm" if device == "cuda" else "eager")
    kwargs = {}
    if getattr(config, "quantization_config", None):
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_id,
        dtype=dtype,
        attn_implementation="eager",
        experts_implementation=experts_implementation,
        device_map=device,
        **kwargs,
    )
    for layer in model.model.layers:
        # transformers 5.17 leaves dequantised MXFP4 experts in bf16 whatever dtype is asked for, and such a model
        # fails in its own experts (fp32 activations against bf16 weights); norms stay as transformers keeps them
        layer.mlp.experts.to(dtype)
    return model


def load_tokenizer(model_id):
    """The model's tokenizer (with its chat template); 'tiny' gives the embedded stand-in's."""
    from transformers import AutoTokenizer

    if model_id == TINY:
        from tiny_gpt_oss import load_tiny_tokenizer

        return load_tiny_tokenizer()  # without building the whole stand-in when only the tokenizer is needed
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except OSError as error:
        raise ModelLoadError(
            f"could not load the tokenizer of {model_id!r} ({error.__class__.__name__}); without Hub access use a "
            "local model directory or --tiny."
        ) from error
