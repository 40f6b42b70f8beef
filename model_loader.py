"""The one way this project loads gpt-oss: MXFP4 checkpoint -> experts as the format below, sink-aware attention.

Every script loads through `load_model` / `load_tokenizer` so that they all agree on:
- the experts' format (below): kept in MXFP4 on a GPU, or dequantised on load (transformers'
  `Mxfp4Config(dequantize=True)`, plain torch, no Hub kernels): bf16 on a GPU, fp32 on a CPU (CPUs have no fast
  bf16 matmul and fp32 keeps the tiny stand-in exact);
- attention: gpt-oss has learnable attention sinks and FlashAttention has no backward for them
  (Dao-AILab/flash-attention#1797), so training through FA2/FA3 would give wrong gradients, and transformers has no
  SDPA path for gpt-oss. On a GPU, gpu_engine/sink_attention.py's: the sinks as one more key of torch's fused attention,
  the same math as eager attention in one kernel each way; on a CPU, transformers' eager attention (the reference);
- the experts implementation: `grouped_mm` on a GPU (one grouped GEMM for all experts, measured fastest),
  `eager` on a CPU (a loop over the few experts a tiny model has; grouped_mm has no fast CPU kernel);
- a clear error instead of an out-of-memory crawl when a 20b-sized model is asked for on a machine without a GPU,
  and, on a GPU, before loading: what the chosen experts format needs against the card's free memory, with what
  fits instead (an out-of-memory error while loading gets the same message).

The experts' format (EXPERTS_FORMAT / --experts-format in every script that loads a model):
- 'auto' (the default): 'mxfp4' on a CUDA GPU when the checkpoint stores its experts in MXFP4 and Triton is
  installed (less than half the memory, and faster: benchmarks/RESULTS.md), otherwise 'bf16' (a CPU, a
  checkpoint with plain experts); `experts_format_of(model)` says which one a loaded model has;
- 'bf16': the MXFP4 experts dequantised on load, as above (fp32 on a CPU): 38 GB of experts at the 20b shape;
- 'mxfp4': the experts stay in the checkpoint's own bytes (mxfp4_experts.Mxfp4Experts; 10.2 GB at the 20b shape),
  the rest loads as for 'bf16'. The model is built on the meta device and each checkpoint tensor is read once,
  straight into its place, so no bf16 copy of the experts exists at any point.

MODEL_ID anywhere in the project may be a Hub id (`openai/gpt-oss-20b`), a local model directory, or `tiny`
(the embedded stand-in, built on first use under runs/, see tiny_gpt_oss.py). A local path that is missing, not a
model directory, without a tokenizer or with a corrupt config.json is a ModelLoadError naming it (never a Hub
lookup). Adapters record their base with `portable_model_id` ('tiny', or a path relative to the repository) and
`resolve_recorded_model_id` finds it again in any checkout.
"""

import copy
import importlib.util
import json
import logging
import os
import re
import warnings

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Mxfp4Config
from transformers.utils import logging as hf_logging

import tiny_gpt_oss
from gpu_engine import sink_attention
from gpu_engine.mxfp4 import INDEX_FILE, SINGLE_FILE, CheckpointError, check_mxfp4_checkpoint, check_weight_files
from gpu_engine.mxfp4_experts import (LORA_TARGETS, Mxfp4Experts, expert_weight_count, gpu_capability, is_mxfp4_experts,
                                      packed_expert_bytes)

TINY = "tiny"
REPOSITORY = os.path.dirname(os.path.abspath(__file__))  # relative model paths recorded with adapters start here
# Above this many parameters a model is not something to run on a CPU here (the tiny stand-in has ~10^5).
MAX_CPU_PARAMETERS = 2_000_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a model directory's tokenizer is in one of these
EXPERTS_FORMATS = ("bf16", "mxfp4")  # how the experts are held: dequantised (bf16 / fp32 on a CPU), or as stored
EXPERTS_FORMAT_CHOICES = ("auto", *EXPERTS_FORMATS)  # what --experts-format takes: 'auto' picks one per machine
MIN_GPU_CAPABILITY = (8, 0)  # bf16 tensor cores, and what the Triton kernels are built for: Ampere or newer


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as asked; the message says which setting to change."""


def resolve_model_id(model_id):
    """'tiny' -> the embedded stand-in's directory (built if needed); anything else is returned unchanged."""
    if model_id == TINY:
        return str(tiny_gpt_oss.ensure_tiny_model())
    return model_id


def portable_model_id(model_id):
    """The model id to record with an adapter so that another checkout of this repository finds the model again.

    'tiny' stays 'tiny'; a directory inside the repository becomes its path relative to the repository root; Hub
    ids and directories elsewhere stay as they are. resolve_recorded_model_id reads it back.
    """
    if model_id == TINY or not os.path.isdir(model_id):
        return model_id
    path = os.path.realpath(model_id)
    if path == os.path.realpath(tiny_dir()):
        return TINY
    relative = os.path.relpath(path, REPOSITORY)
    return model_id if relative.startswith("..") else relative


def resolve_recorded_model_id(model_id):
    """A model id as recorded by portable_model_id (or by an older run), resolved in this checkout.

    A relative path is taken from the repository root; an absolute directory that no longer exists (the run was
    made in a checkout since moved or re-cloned) is looked for under this checkout by its trailing path
    components; anything else (a Hub id, 'tiny', an existing directory) is returned unchanged.
    """
    if model_id == TINY or os.path.isabs(model_id) and os.path.isdir(model_id):
        return model_id
    if not os.path.isabs(model_id):
        here = os.path.join(REPOSITORY, model_id)
        return here if os.path.isdir(here) else model_id
    parts = os.path.normpath(model_id).split(os.sep)[1:]
    for start in range(len(parts) - 1):  # the longest tail first, at least two components
        candidate = os.path.join(REPOSITORY, *parts[start:])
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return TINY if os.path.realpath(candidate) == os.path.realpath(tiny_dir()) else candidate
    return model_id


def tiny_dir():
    return tiny_gpt_oss.TINY_DIR


def count_parameters(config):
    """Parameter count of a gpt-oss config, computed from its shape (no weights needed)."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q + q + 2 * (h * kv + kv) + q * h + h + config.num_attention_heads
    experts = e * (h * 2 * i + 2 * i + i * h + h) + e * h + e
    per_layer = attention + experts + 2 * h
    return config.num_hidden_layers * per_layer + 2 * config.vocab_size * h + h


def find_config(model):
    """The gpt-oss config of a plain or PEFT-wrapped model."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def check_local_model_id(model_id, need_config=True):
    """ModelLoadError for a model id that names a local path but no usable model directory there.

    A Hub id is `owner/name`; anything else with a slash (absolute, `./`, `~`, deeper paths) or whose owner part
    is a local directory is a path, and a missing one is said so at once instead of after a minute of Hub retries.
    A directory's config.json must be there (unless need_config=False: a tokenizer alone needs none) and readable.
    """
    if os.path.isdir(model_id):
        config_path = os.path.join(model_id, "config.json")
        if not os.path.isfile(config_path):
            if not need_config:
                return
            raise ModelLoadError(f"{model_id}: no config.json in this directory; is it a complete model directory?")
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{config_path}: corrupt, not readable as JSON ({error}); copy the model directory "
                                 "again (or rebuild it: python tiny_gpt_oss.py --rebuild for the stand-in)") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{config_path}: corrupt, not a JSON object; copy the model directory again")
        return
    path_like = (os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1
                 or ("/" in model_id and os.path.isdir(model_id.split("/")[0])))
    if os.path.exists(model_id):
        raise ModelLoadError(f"{model_id}: a file, not a model directory; pass a model directory, a Hub id or 'tiny'")
    if path_like:
        raise ModelLoadError(f"{model_id}: no such model directory; check the path (a Hub id has the form "
                             "owner/name, e.g. openai/gpt-oss-20b)")


def load_config(model_id):
    """AutoConfig for a gpt-oss model, with errors that say what to do; a local model directory's weight files are
    checked too (index, safetensors headers: mxfp4.check_weight_files), so every script that loads a model, or an
    adapter's base, names a broken file instead of failing inside a library."""
    check_local_model_id(model_id)
    if os.path.isdir(model_id):
        try:
            check_weight_files(model_id)  # a broken index or safetensors file, named before anything reads it
        except (CheckpointError, OSError) as error:
            raise ModelLoadError(str(error)) from None
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        if os.path.isdir(model_id):
            raise ModelLoadError(f"{model_id}: its config.json cannot be used ({one_line(error)}); is it a "
                                 "gpt-oss model directory?") from None
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


def one_line(error):
    """An exception's message on one line, at most 300 characters (transformers' messages run long)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def pick_device(device=None):
    """'cuda' when a GPU is present, else 'cpu' (or the device asked for)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_id, device=None, dtype=None, experts_implementation=None, experts_format="auto",
               headroom_gib=0.0):
    """Load a gpt-oss model for training or inference: the attention of `attention_implementation`, experts as
    `experts_format` says ('auto': choose_experts_format).

    Returns the model on `device` ('cuda' when available, else 'cpu') in `dtype` (bf16 on GPU, fp32 on CPU).
    On a GPU the card's free memory must hold the weights plus `headroom_gib` (what the caller will need beyond
    them: train_grpo.py passes its memory plan's, training/memory_plan.py), or a ModelLoadError says what fits; and the
    card must be of MIN_GPU_CAPABILITY or newer.
    """
    if experts_format not in EXPERTS_FORMAT_CHOICES:
        raise ModelLoadError(f"experts format {experts_format!r} is not one of {', '.join(EXPERTS_FORMAT_CHOICES)}")
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
    quantized = getattr(config, "quantization_config", None)
    if os.path.isdir(model_id) and quantized:
        try:
            check_mxfp4_checkpoint(model_id)
        except CheckpointError as error:
            raise ModelLoadError(str(error)) from None
    experts_format = choose_experts_format(experts_format, device, bool(quantized))
    if experts_format == "mxfp4" and not quantized:
        raise ModelLoadError(f"{model_id}: its experts are not stored in MXFP4 (no quantization_config in its "
                             "config.json), so they cannot stay in MXFP4; use --experts-format bf16")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if device.startswith("cuda"):
        check_gpu_generation(device)
        check_gpu_memory(model_id, config, experts_format, headroom_gib)
    if experts_format == "mxfp4":
        try:
            return load_mxfp4_resident(model_id, config, device, dtype)
        except torch.OutOfMemoryError:
            raise ModelLoadError(memory_message(model_id, config, experts_format, headroom_gib)) from None
    experts_implementation = experts_implementation or ("grouped_mm" if device == "cuda" else "eager")
    kwargs = {}
    if getattr(config, "quantization_config", None):
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    silence_known_notices()

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-tensor 'Loading weights' bar; the scripts say when loading ends
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_id,
            dtype=dtype,
            attn_implementation=attention_implementation(device),
            experts_implementation=experts_implementation,
            device_map=device,
            **kwargs,
        )
    except OSError as error:
        where = "its weights cannot be read" if os.path.isdir(model_id) else "it cannot be downloaded"
        raise ModelLoadError(f"{model_id}: {where} ({one_line(error)}); copy or download the model again") from None
    except torch.OutOfMemoryError:
        raise ModelLoadError(memory_message(model_id, config, experts_format, headroom_gib)) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    for layer in model.model.layers:
        # transformers 5.17 leaves dequantised MXFP4 experts in bf16 whatever dtype is asked for, and such a model
        # fails in its own experts (fp32 activations against bf16 weights); norms stay as transformers keeps them
        layer.mlp.experts.to(dtype)
    return model


def choose_experts_format(experts_format, device, quantized):
    """The format 'auto' stands for: 'mxfp4' on a CUDA device for a checkpoint with MXFP4 experts (`quantized`) when
    Triton, which multiplies them, is installed; 'bf16' otherwise. A format asked for by name is returned as it is."""
    if experts_format != "auto":
        return experts_format

    on_gpu = str(device).startswith("cuda")
    return "mxfp4" if on_gpu and quantized and importlib.util.find_spec("triton") is not None else "bf16"


def experts_format_of(model):
    """'mxfp4' when the model's experts are mxfp4_experts.Mxfp4Experts (PEFT's wrappers looked through), else 'bf16'."""
    return "mxfp4" if any(is_mxfp4_experts(module) for module in model.modules()) else "bf16"


def weight_bytes(config, experts_format):
    """GPU bytes of a gpt-oss model's weights: bf16 everywhere, or with the experts as MXFP4 blocks and scales."""
    expert_values = expert_weight_count(config)
    rest = 2 * (count_parameters(config) - expert_values)
    return rest + (packed_expert_bytes(config) if experts_format == "mxfp4" else 2 * expert_values)


def usable_gpu_bytes():
    """Bytes this process can still allocate on the current GPU: free on the card plus what torch's caching allocator
    holds unused (freed tensors it keeps for reuse), within the process's memory cap
    (torch.cuda.set_per_process_memory_fraction)."""
    free, total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    cap = torch.cuda.get_per_process_memory_fraction() * total - torch.cuda.memory_allocated()
    return min(free + cached, cap)


def memory_message(model_id, config, experts_format, headroom_gib):
    """What the chosen format needs, what this card has, and what fits."""
    usable = usable_gpu_bytes() / 2**30
    needs = {fmt: weight_bytes(config, fmt) / 2**30 + headroom_gib for fmt in EXPERTS_FORMATS}
    what = "weights" + (f" + {headroom_gib:.1f} GiB to train" if headroom_gib else "")
    fits = [fmt for fmt in EXPERTS_FORMATS if needs[fmt] <= usable]
    if experts_format != "mxfp4" and "mxfp4" in fits:
        advice = (f"--experts-format mxfp4 needs ~{needs['mxfp4']:.0f} GiB and fits: use it (the experts stay in "
                  "MXFP4, an expert LoRA beside them)")
    elif fits:
        advice = "free memory held by other processes on this card, then run again"
    else:
        advice = (f"even --experts-format mxfp4 needs ~{needs['mxfp4']:.0f} GiB: use a card with more memory, free "
                  "what other processes hold, or lower the settings that size a step (--train-batch-size, "
                  "--max-completion-len)")
    return (f"{model_id}: with --experts-format {experts_format} this needs ~{needs[experts_format]:.0f} GiB of GPU "
            f"memory ({what}), and this card has {usable:.1f} GiB usable; {advice}.")


def check_gpu_generation(device="cuda"):
    """ModelLoadError before loading on a card older than MIN_GPU_CAPABILITY (a T4, a V100), which has no bf16
    tensor cores and runs none of the project's Triton kernels."""
    capability = gpu_capability(device)
    if capability < MIN_GPU_CAPABILITY:
        raise ModelLoadError(
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; this "
            f"project needs {MIN_GPU_CAPABILITY[0]}.{MIN_GPU_CAPABILITY[1]} or newer (Ampere: A100, A10, RTX 30xx; "
            "Ada: L4, RTX 40xx; Hopper: H100, H200; Blackwell: RTX 50xx) for bf16 and its Triton kernels. On an "
            "older card use a newer one, or run the embedded stand-in on the CPU (--tiny)")


def check_gpu_memory(model_id, config, experts_format, headroom_gib):
    """ModelLoadError before loading when the card cannot hold the weights plus the headroom asked for."""
    if not torch.cuda.is_available():
        return
    if weight_bytes(config, experts_format) + headroom_gib * 2**30 > usable_gpu_bytes():
        raise ModelLoadError(memory_message(model_id, config, experts_format, headroom_gib))


def attention_implementation(device):
    """The attn_implementation for a model on `device`, registered with transformers first
    (gpu_engine/sink_attention.py)."""
    sink_attention.register()
    return sink_attention.implementation_for(device)


def load_mxfp4_resident(model_id, config, device, dtype):
    """The model with mxfp4_experts.Mxfp4Experts holding the checkpoint's expert bytes as they are.

    Built on the meta device (nothing allocated), the experts swapped for MXFP4 ones, then every tensor of the
    checkpoint read once into its place on `device`: the peak is the model's own size.
    """
    device = indexed_device(device)
    plain = copy.deepcopy(config)
    del plain.quantization_config  # what the model holds is said by its modules, not by a quantizer
    silence_known_notices()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain, dtype=dtype,
                                                 attn_implementation=attention_implementation(device))
    for layer in model.model.layers:
        layer.mlp.experts = Mxfp4Experts.like(layer.mlp.experts, device="meta")
    model.to_empty(device=device)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    loaded = set()
    directory = local_directory(model_id)
    for path in checkpoint_files(directory):
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                if name not in targets:
                    raise ModelLoadError(f"{path}: tensor {name} has no place in a gpt-oss model; is this a gpt-oss "
                                         "MXFP4 checkpoint?")
                tensor = handle.get_tensor(name)
                if tensor.shape != targets[name].shape:
                    raise ModelLoadError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config says "
                                         f"{tuple(targets[name].shape)}; the checkpoint and its config.json disagree")
                with torch.no_grad():
                    targets[name].copy_(tensor)
                loaded.add(name)
                del tensor
    # every tensor but the experts' empty stand-ins for the names an expert LoRA targets (Mxfp4Experts)
    persistent = {name for name in model.state_dict() if name.rpartition(".")[2] not in LORA_TARGETS}
    missing = sorted(persistent - loaded - tied_names(model))
    if missing:
        raise ModelLoadError(f"{model_id}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}; copy "
                             "the model directory again")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained builds it: its tables were on meta
    try:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=plain).to(device)
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval()
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def indexed_device(device):
    """'cuda' as this process's GPU ('cuda:N', N the current device, which accelerate sets per process): safetensors
    reads a bare 'cuda' as GPU 0, so each process of a multi-GPU run would stage every tensor on the first card."""
    if str(device) == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def local_directory(model_id):
    """A model directory on this machine: the path itself, or a Hub id's files in the Hub cache (downloaded there
    on first use, with HF_TOKEN from the environment where the repository needs one)."""
    if os.path.isdir(model_id):
        return model_id

    try:
        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # the Hub client raises many types (offline, not found, gated, ...)
        raise ModelLoadError(f"could not fetch {model_id!r} from the Hugging Face Hub ({one_line(error)}); without "
                             "Hub access pass a local model directory, or --tiny") from None


def checkpoint_files(directory):
    """The safetensors files of a model directory (sharded or not)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(directory, name) for name in files]
    return [os.path.join(directory, SINGLE_FILE)]


def tied_names(model):
    """Names of parameters that are tied to another (never stored twice in a checkpoint)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


class DropMessages(logging.Filter):
    """Drops log records whose whole message matches the regular expression `pattern`."""

    def __init__(self, pattern):
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record):
        return not self.pattern.fullmatch(record.getMessage())


def silence_known_notices():
    """Drop library notices that are harmless for how this project loads and trains gpt-oss, and only those.

    - transformers says 'MXFP4 inference on CPU requires use_kernels=True' whenever an MXFP4 checkpoint is loaded on
      a CPU, even when dequantising is what was asked for (Mxfp4Config(dequantize=True), as here);
    - PEFT and TRL read the model's `is_gradient_checkpointing`, which transformers >= 5.2x marks as deprecated with
      a FutureWarning at every read (every checkpoint save); the libraries, not this project, must move on;
    - torch inductor, compiling the rollout engine's decode functions on a GPU, warns that it split a softmax's
      reduction instead of computing it online: a choice of its own, printed in the middle of an evaluation;
    - the Trainer says the tokenizer has 'new PAD/BOS/EOS tokens' when the model's config lacks one the tokenizer
      has: openai/gpt-oss-20b's published config.json has no bos_token_id, so every run of the real model (and of
      the 20b stand-in, which copies that config) was told so, and the Trainer fills it in itself. Only that
      notice, with the BOS id alone updated: a changed EOS or PAD (which changes where generation stops) still shows.
    Idempotent; everything else those loggers say still shows.
    """
    for name, pattern in (("transformers.quantizers.quantizer_mxfp4", r"MXFP4 inference on CPU requires use_kernels.*"),
                          ("transformers.trainer_utils",
                           r"The tokenizer has new PAD/BOS/EOS tokens .*Updated tokens: \{'bos_token_id': \d+\}\.")):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(pattern))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly", category=UserWarning)


def load_tokenizer(model_id):
    """The model's tokenizer (with its chat template); 'tiny' gives the embedded stand-in's."""
    if model_id == TINY:
        return tiny_gpt_oss.load_tiny_tokenizer()  # without building the whole stand-in when only the tokenizer is needed
    check_local_model_id(model_id, need_config=False)
    if os.path.isdir(model_id) and not any(os.path.isfile(os.path.join(model_id, name)) for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_id}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) in this model directory; "
                             "copy the tokenizer files of the model it was made from into it")
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as error:
        if os.path.isdir(model_id):
            raise ModelLoadError(f"{model_id}: its tokenizer cannot be loaded ({one_line(error)}); copy the "
                                 "tokenizer files of the model it was made from into it") from None
        raise ModelLoadError(
            f"could not load the tokenizer of {model_id!r} ({error.__class__.__name__}); without Hub access use a "
            "local model directory or --tiny."
        ) from error
