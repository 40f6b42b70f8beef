"""Build stand-in gpt-oss checkpoints in the real format, for machines where the real weights are out of reach.

    python tiny_gpt_oss.py                 # the tiny stand-in (default), cached under runs/stand-ins/
    python tiny_gpt_oss.py --rebuild       # build it again even if the cached one is current
    python tiny_gpt_oss.py --shape 20b     # the exact openai/gpt-oss-20b shape, random weights (~13 GB, GPU advised)
    python tiny_gpt_oss.py --shape 20b --tokenizer path/to/o200k_harmony   # ... carrying a local copy of the real tokenizer

Both are complete model directories that load like openai/gpt-oss-20b does
(`AutoModelForCausalLM.from_pretrained(dir, quantization_config=Mxfp4Config(dequantize=True))`):
a `GptOssForCausalLM` whose experts are stored as MXFP4 `*_blocks` / `*_scales` tensors, a config with the
mxfp4 `quantization_config`, a byte-level BPE tokenizer that carries the Harmony special tokens and the original
gpt-oss chat template, and a generation config that stops at <|return|>, <|endoftext|> and <|call|>.

- tiny: ~2.5x10^5 parameters, small enough to train on 2 CPU cores, with sliding and full attention layers,
  sinks, and top-2 routing over 4 experts. Its tokenizer is trained on the project's own prompts. It is
  warm-started on Harmony answers to the training prompts in data/ with *random* actions, so it knows the format
  (an analysis message, then a final message holding one bracketed action) but not the policy: that is what GRPO
  must teach (see warm_start for the probe that gives it a reading of the situation, as pretraining would).
  The last warm-start steps run with the experts already rounded to MXFP4 and frozen, so the stored experts are
  exactly the ones it was trained with; the other weights are stored in bf16, as in the real checkpoint.
  Deterministic: the same recipe gives the same weights, bit for bit.
- 20b: openai/gpt-oss-20b's published configuration with random weights (no warm start), written layer by layer.
  It carries the real gpt-oss tokenizer (`--tokenizer`: a Hub id, by default openai/gpt-oss-20b, or a local copy),
  so that prompts are as long as the real model sees them: speed and memory figures depend on it. Where none can be
  loaded it falls back, with a warning, to the tiny tokenizer padded to the real vocabulary size (the Harmony
  special tokens at their real ids), whose prompts are ~2.4x shorter than the real ones.

A build is written into a temporary directory and renamed when complete, so an interrupted build is never
mistaken for a finished one; `recipe.json` inside records what it was built from and the cache is rebuilt when
the recipe changes.
"""

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pandas as pd
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast

import harmony
from gpu_engine.mxfp4 import dequantize_expert_weights, quantize_expert_weights, save_mxfp4_checkpoint

ROOT = Path(__file__).resolve().parent
# -----------------------------------------------------------------------------
STAND_IN_DIR = ROOT / "runs" / "stand-ins"  # where built stand-ins are cached
TINY_DIR = STAND_IN_DIR / "gpt-oss-tiny"  # the tiny stand-in that MODEL_ID "tiny" names
DATA_FILE = ROOT / "data" / "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv"  # prompts to learn from
PROMPT_DATE = "2025-05-05"  # the 'Current date' pinned into rendered prompts (the data's first day)
BPE_VOCAB = 2048  # learned byte-level BPE entries before the special tokens (fewer tokens per prompt = faster)
# tiny architecture: sizes are multiples of 32 as MXFP4 needs; layer 0 slides, layer 1 sees everything
TINY_HIDDEN = 64  # hidden size
TINY_INTERMEDIATE = 64  # expert intermediate size
TINY_LAYERS = 2  # decoder layers, alternating sliding / full attention like the real model
TINY_EXPERTS = 4  # experts per layer
TINY_TOP_K = 2  # experts per token
TINY_HEADS = 4  # query heads
TINY_KV_HEADS = 2  # key/value heads
TINY_HEAD_DIM = 16  # per-head dimension
TINY_SLIDING_WINDOW = 128  # tokens a sliding layer sees (the real model's window)
# warm start: supervised on Harmony answers with random actions, loss on the completion only
WARM_STEPS = 500  # optimiser steps with all weights free
WARM_QUANTIZED_STEPS = 100  # further steps with experts rounded to MXFP4 and frozen
WARM_BATCH = 32  # sequences per step
WARM_LR = 3e-3  # AdamW learning rate
PROBE_WEIGHT = 1.0  # weight of the auxiliary probe loss (see warm_start)
SEED = 1234  # one seed for tokenizer order, weights, and the warm-start batches
TOKENIZER_20B = "openai/gpt-oss-20b"  # tokenizer the 20b stand-in carries: Hub id or local directory (see load_20b_tokenizer)
# -----------------------------------------------------------------------------

PLAIN_WORDS = (("low", "average", "high"), ("empty", "low", "half full", "high", "full"), ("small", "moderate", "large"))
SPECIAL_TOKEN = re.compile(r"<\|[a-z_0-9]+\|>")

GPT_OSS_20B = dict(  # openai/gpt-oss-20b config.json, as published
    num_hidden_layers=24,
    num_local_experts=32,
    num_experts_per_tok=4,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * 12,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    attention_bias=True,
    attention_dropout=0.0,
    swiglu_limit=7.0,
    router_aux_loss_coef=0.9,
    tie_word_embeddings=False,
    initializer_range=0.02,
    hidden_act="silu",
    output_router_logits=False,
    use_cache=True,
)


def read_training_prompts(path=DATA_FILE):
    """The legacy-text prompts of the training split, in file order."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the stand-in learns its tokenizer and format from this file; regenerate it "
                                "with `python data/make_tes_dataset.py` (see data/README.md)")
    frame = pd.read_csv(path, keep_default_na=False)
    return frame.loc[frame["split"] == "train", "prompt"].tolist()


def read_plain_words(prompt):
    """The prompt's plain reading of the situation: (CO2 now, tank, load) words, or None if it has none."""
    co2 = re.search(r"CO2 now is (high|low|about)", prompt)
    tank = re.search(r"Tank: [^)]*\), (empty|low|half full|high|full)\.", prompt)
    load = re.search(r"Cooling load this hour: [^,]*, (small|moderate|large)\.", prompt)
    if not (co2 and tank and load):
        return None
    return co2[1].replace("about", "average"), tank[1], load[1]


def write_analysis(prompt):
    """The analysis message of a warm-start answer: the plain reading of the situation, copied from the prompt.

    Repeating the situation's plain words right before the decision gives a tiny model a short path from
    the words that matter to the action token; which action those words call for is left for GRPO to learn.
    """
    words = read_plain_words(prompt)
    if words is None:
        return "I compare the CO2 factor now with the coming hours and look at the tank and the load."
    return "CO2 is {} now, the tank is {}, the load is {}.".format(*words)


def word_labels(prompt):
    """Class indices of the plain words, the targets of the warm start's auxiliary probe (-100 when absent)."""
    words = read_plain_words(prompt)
    if words is None:
        return [-100] * len(PLAIN_WORDS)
    return [choices.index(word) for choices, word in zip(PLAIN_WORDS, words)]


def byte_level_pre_tokenizer():
    """Digits one by one, everything else free to merge across spaces.

    Whole phrases that every prompt repeats (the system message, the developer instructions, the wording of
    the situation) become a few tokens, which makes prompts short for a small model on a CPU, while numbers
    stay readable digit by digit.
    """
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def train_bpe(texts, vocab_size):
    """A byte-level BPE `tokenizers.Tokenizer` learned from `texts` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def pad_bpe(tokenizer, size):
    """Pad a BPE vocabulary with unreachable filler entries so that the next added token gets id `size`."""
    state = json.loads(tokenizer.to_str())
    vocab, merges = state["model"]["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                              for m in state["model"]["merges"]]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), size)})
    padded = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    padded.pre_tokenizer = byte_level_pre_tokenizer()
    padded.decoder = decoders.ByteLevel()
    return padded


def rendered_examples(prompts):
    """Harmony prompt + answer texts the tokenizer learns from: what the model will actually read and write."""
    renderer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))  # only its chat template is used
    renderer.chat_template = harmony.load_chat_template()
    for i, prompt in enumerate(prompts):
        effort = harmony.REASONING_EFFORTS[i % 3]
        yield harmony.render_prompt(renderer, prompt, effort, PROMPT_DATE) + harmony.format_answer(
            write_analysis(prompt), i % 4
        )


def build_tokenizer(prompts, real_ids=False):
    """A fast tokenizer with the Harmony special tokens and the gpt-oss chat template.

    With `real_ids` the vocabulary is padded so the special tokens sit at their ids in the real
    o200k_harmony vocabulary and the size is the real 201088.
    """
    texts = [piece for text in rendered_examples(prompts) for piece in SPECIAL_TOKEN.split(text) if piece]
    bpe = train_bpe(texts, BPE_VOCAB)
    specials = sorted(harmony.SPECIAL_TOKEN_IDS, key=harmony.SPECIAL_TOKEN_IDS.get)
    if real_ids:
        bpe = pad_bpe(bpe, min(harmony.SPECIAL_TOKEN_IDS.values()))
        last = max(harmony.SPECIAL_TOKEN_IDS.values())
        specials += [f"<|reserved_{i}|>" for i in range(last + 1, GPT_OSS_20B["vocab_size"])]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.chat_template = harmony.load_chat_template()
    if real_ids:
        for token, token_id in harmony.SPECIAL_TOKEN_IDS.items():
            assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert len(tokenizer) == GPT_OSS_20B["vocab_size"], len(tokenizer)
    return tokenizer


def tiny_config(tokenizer):
    """GptOssConfig of the tiny stand-in, sized to its tokenizer."""
    return GptOssConfig(
        num_hidden_layers=TINY_LAYERS,
        num_local_experts=TINY_EXPERTS,
        num_experts_per_tok=TINY_TOP_K,
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        sliding_window=TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (TINY_LAYERS // 2),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        **special_ids(tokenizer),
    )


def gpt_oss_20b_config():
    """GptOssConfig equal to openai/gpt-oss-20b's published config.json (its token ids are the real ones)."""
    return GptOssConfig(**GPT_OSS_20B, eos_token_id=harmony.SPECIAL_TOKEN_IDS["<|return|>"],
                        pad_token_id=harmony.SPECIAL_TOKEN_IDS["<|endoftext|>"])


def special_ids(tokenizer):
    return dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|return|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def generation_config(tokenizer):
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=harmony.stop_token_ids(tokenizer),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=True,
    )


def make_warm_start_batch(encode, prompts, generator, pad_id):
    """One batch of (input_ids, labels, attention_mask, decision positions, word labels).

    Random prompt, reasoning effort and action; `encode(prompt_index, effort, action)` returns (prompt ids,
    answer ids); labels cover the answer only. The decision position is the '[' before the action digit.
    """
    picks = torch.randint(len(prompts), (WARM_BATCH,), generator=generator).tolist()
    efforts = torch.randint(3, (WARM_BATCH,), generator=generator).tolist()
    actions = torch.randint(4, (WARM_BATCH,), generator=generator).tolist()
    rows, positions, words = [], [], []
    for pick, effort, action in zip(picks, efforts, actions):
        p_ids, a_ids = encode(pick, effort, action)
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
        positions.append(len(p_ids) + len(a_ids) - 4)  # '[' digit ']' <|return|>
        words.append(word_labels(prompts[pick]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return input_ids, labels, attention, torch.tensor(positions), torch.tensor(words)


def make_encoder(tokenizer, prompts):
    """Cached (prompt index, effort, action) -> (prompt ids, answer ids): rendering is the slow part of a step."""
    @functools.lru_cache(maxsize=None)
    def encode_prompt(pick, effort):
        text = harmony.render_prompt(tokenizer, prompts[pick], harmony.REASONING_EFFORTS[effort], PROMPT_DATE)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.lru_cache(maxsize=None)
    def encode_answer(pick, action):
        return tokenizer(harmony.format_answer(write_analysis(prompts[pick]), action), add_special_tokens=False)[
            "input_ids"]

    return lambda pick, effort, action: (encode_prompt(pick, effort), encode_answer(pick, action))


def round_experts_to_mxfp4(model):
    """Replace every expert weight by its MXFP4 value (what the saved checkpoint will hold)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                packed = quantize_expert_weights(name, param)
                blocks, scales = (packed[k] for k in sorted(packed))  # *_blocks sorts before *_scales
                param.copy_(dequantize_expert_weights(blocks, scales, dtype=param.dtype))


def warm_start(model, tokenizer, prompts, log=print):
    """Teach the format, and give the decision position a reading of the situation; not the policy.

    Supervised steps on Harmony answers with *random* actions (loss on the answer only), the last
    WARM_QUANTIZED_STEPS with the experts rounded to MXFP4 and frozen. Beside the language-model loss, a linear
    probe (thrown away afterwards) must read the prompt's plain words (CO2 high/low, tank level, load size) from
    the final hidden state at the '[' before the action digit. A real pretrained model carries such features
    everywhere; without the probe a model this small keeps none at the decision position (its actions are
    random), and GRPO would first have to grow them. The probe says nothing about which action is good.
    """
    generator = torch.Generator().manual_seed(SEED)
    encode = make_encoder(tokenizer, prompts)
    probes = torch.nn.ModuleList(torch.nn.Linear(model.config.hidden_size, len(c)) for c in PLAIN_WORDS)
    model.train()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(probes.parameters()), lr=WARM_LR, weight_decay=0.0)
    start = time.time()
    for step in range(WARM_STEPS + WARM_QUANTIZED_STEPS):
        if step == WARM_STEPS:
            round_experts_to_mxfp4(model)
            for name, param in model.named_parameters():
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    param.requires_grad_(False)
        input_ids, labels, attention, positions, words = make_warm_start_batch(
            encode, prompts, generator, tokenizer.pad_token_id)
        out = model(input_ids=input_ids, attention_mask=attention, labels=labels, output_hidden_states=True)
        decision = out.hidden_states[-1][torch.arange(len(positions)), positions]
        probe_loss = sum(torch.nn.functional.cross_entropy(probe(decision), words[:, k], ignore_index=-100)
                         for k, probe in enumerate(probes))
        loss = out.loss + PROBE_WEIGHT * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == WARM_STEPS + WARM_QUANTIZED_STEPS - 1:
            log(f"  warm start step {step:4d}  loss {out.loss.item():.3f}  probe {probe_loss.item():.3f}  "
                f"({time.time() - start:.0f} s)")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def recipe_fingerprint():
    """Hash of everything a tiny build depends on: this file, harmony.py, gpu_engine/mxfp4.py and the data."""
    digest = hashlib.sha256()
    for path in (Path(__file__), ROOT / "harmony.py", ROOT / "gpu_engine" / "mxfp4.py", DATA_FILE):
        digest.update(path.read_bytes())
    digest.update(torch.__version__.split("+")[0].encode())
    return digest.hexdigest()[:16]


def write_model_dir(state_dict, config, tokenizer, out_dir, recipe):
    """Write a complete MXFP4 model directory: weights, config, generation config, tokenizer, recipe.json."""
    save_mxfp4_checkpoint(state_dict, config, out_dir)
    generation_config(tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def write_then_publish(out_dir, write):
    """Run `write(tmp_dir)` into a fresh temporary directory beside `out_dir`, then rename it into place.

    Anything that goes wrong (Ctrl-C included) removes the temporary directory: a half-written build never sits
    where a finished one is looked for.
    """
    tmp_dir = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    try:
        write(tmp_dir)
        apply_umask(tmp_dir)
        publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def apply_umask(directory):
    """Give a build the modes any file made here gets (mkdtemp makes 0700, and some writers 0600): with the usual
    umask another user on a shared machine can read the stand-in, as they can the rest of the checkout."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *Path(directory).rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(tmp_dir, final_dir):
    """Move a finished build into place, replacing an older one (rename is atomic within a filesystem)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        Path(tmp_dir).rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        Path(tmp_dir).rename(final_dir)
    return final_dir


def build_tiny(out_dir=None, log=print):
    """Build the tiny stand-in into `out_dir` (default runs/stand-ins/gpt-oss-tiny) and return its path.

    The process's random state comes back as it was: a run that builds the stand-in on its way (the README's
    first `train_grpo.py --tiny` on a fresh clone seeds torch, then asks for the model) must draw its LoRA
    initialisation from the same stream as a run that finds the stand-in built.
    """
    with torch.random.fork_rng(devices=[]):
        return build_tiny_model(out_dir, log)


def build_tiny_model(out_dir, log):
    out_dir = Path(out_dir or TINY_DIR)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.manual_seed(SEED)
    # the experts' scatter/index_add backward is not bit-reproducible by default, even on a CPU
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    prompts = read_training_prompts()
    tokenizer = build_tokenizer(prompts)
    config = tiny_config(tokenizer)
    model = GptOssForCausalLM(config)
    model.set_attn_implementation("eager")
    log(f"building the tiny stand-in: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"vocabulary {len(tokenizer)}, {len(prompts)} training prompts")
    try:
        warm_start(model, tokenizer, prompts, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    round_experts_to_mxfp4(model)  # already exact after the frozen phase; kept so the saved weights are its values
    recipe = {"kind": "tiny", "fingerprint": recipe_fingerprint(), "seed": SEED,
              "build_seconds": round(time.time() - start, 1)}
    write_then_publish(out_dir, lambda tmp_dir: write_model_dir(model.state_dict(), config, tokenizer, tmp_dir, recipe))
    log(f"wrote {out_dir} in {time.time() - start:.0f} s")
    return out_dir


def is_current(model_dir):
    """True when `model_dir` holds a finished tiny build of the current recipe."""
    recipe = Path(model_dir) / "recipe.json"
    if not recipe.is_file():
        return False
    return json.loads(recipe.read_text()).get("fingerprint") == recipe_fingerprint()


def ensure_tiny_model(rebuild=False, log=None):
    """Path of the tiny stand-in, building it first when missing, outdated or when asked to."""
    out_dir = TINY_DIR
    if rebuild or not is_current(out_dir):
        build_tiny(out_dir, log=log or (lambda msg: print(msg, file=sys.stderr)))
    return out_dir


def load_tiny_tokenizer():
    """The tiny stand-in's tokenizer: from the cached build when current, else built on its own (a second)."""
    out_dir = TINY_DIR
    if is_current(out_dir):
        return AutoTokenizer.from_pretrained(out_dir)
    return build_tokenizer(read_training_prompts())


def random_tensor(shape, name, device):
    """Random weights in the spirit of the model's own initialisation (normal 0.02; norms 1; biases 0).

    Each tensor has its own seed, derived from its name, so the values do not depend on the order of writing.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=torch.bfloat16)
    if name.endswith(("bias", "_bias")):
        return torch.zeros(shape, device=device, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(SEED + zlib.crc32(name.encode()))
    return (torch.randn(shape, device=device, generator=generator) * 0.02).to(torch.bfloat16)


def load_20b_tokenizer(source=TOKENIZER_20B, log=print):
    """(tokenizer, what it is) for the 20b stand-in: the real gpt-oss tokenizer from `source`, checked, or -- only
    when the default Hub id cannot be reached -- the padded stand-in tokenizer, with a warning."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if source != TOKENIZER_20B:
            raise SystemExit(f"error: --tokenizer {source}: no tokenizer could be loaded from it ({error}); give a "
                             "directory holding tokenizer.json and tokenizer_config.json, or a Hub id") from None
        log(f"warning: the tokenizer of {source} could not be loaded ({error.__class__.__name__}; no Hub access?). "
            "The stand-in gets the tiny tokenizer padded to the real vocabulary, whose prompts are ~2.4x shorter than "
            "the real model's: speed and memory figures will flatter. Pass --tokenizer with a local copy of the real "
            "one (o200k_harmony) for real prompt lengths.")
        return build_tokenizer(read_training_prompts(), real_ids=True), "stand-in (padded tiny BPE)"
    problems = [f"{token} has id {tokenizer.convert_tokens_to_ids(token)}, expected {token_id}"
                for token, token_id in harmony.SPECIAL_TOKEN_IDS.items()
                if token in (*harmony.STOP_TOKENS, "<|start|>", "<|end|>", "<|message|>", "<|channel|>")
                and tokenizer.convert_tokens_to_ids(token) != token_id]
    if len(tokenizer) > GPT_OSS_20B["vocab_size"]:
        problems.append(f"{len(tokenizer)} entries, more than the model's {GPT_OSS_20B['vocab_size']}")
    if problems:
        raise SystemExit(f"error: --tokenizer {source} is not a gpt-oss (o200k_harmony) tokenizer: " + "; ".join(problems))
    if not tokenizer.chat_template:
        tokenizer.chat_template = harmony.load_chat_template()
    return tokenizer, str(source)


def build_20b(out_dir=None, device=None, tokenizer_source=TOKENIZER_20B, log=print):
    """Write the gpt-oss-20b-shaped stand-in (random weights, MXFP4 experts) layer by layer; return its path."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir or STAND_IN_DIR / "gpt-oss-20b-shape")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tokenizer, tokenizer_name = load_20b_tokenizer(tokenizer_source, log)
    config = gpt_oss_20b_config()
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in GptOssForCausalLM(config).state_dict().items()}
    # A lazy mapping: each tensor is made when the writer asks for it, so the whole model never sits in memory.
    state_dict = LazyRandomStateDict(shapes, device)
    def write(tmp_dir):
        save_mxfp4_checkpoint(state_dict, config, tmp_dir)
        generation_config(tokenizer).save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        recipe = {"kind": "20b", "seed": SEED, "tokenizer": tokenizer_name, "device": device,
                  "build_seconds": round(time.time() - start, 1)}
        (tmp_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    write_then_publish(out_dir, write)
    log(f"wrote {out_dir} in {time.time() - start:.0f} s")
    return out_dir


class LazyRandomStateDict(dict):
    """name -> random tensor, made on access (a dict of shapes underneath, so keys() and len() work)."""

    def __init__(self, shapes, device):
        super().__init__(shapes)
        self.device = device

    def __getitem__(self, name):
        return random_tensor(super().__getitem__(name), name, self.device)

    def items(self):
        return ((name, self[name]) for name in self.keys())

    def values(self):
        return (self[name] for name in self.keys())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="build the tiny stand-in (the default)")
    parser.add_argument("--shape", choices=["tiny", "20b"], default="tiny", help="which stand-in to build")
    parser.add_argument("--rebuild", action="store_true", help="build even if a current one is cached")
    parser.add_argument("--out", default=None, help="output directory (default under runs/stand-ins/)")
    parser.add_argument("--tokenizer", default=TOKENIZER_20B,
                        help=f"20b only: the real gpt-oss tokenizer, a Hub id or local directory (default {TOKENIZER_20B})")
    args = parser.parse_args(argv)
    if args.shape == "20b":
        build_20b(args.out, tokenizer_source=args.tokenizer)
    elif args.out:
        build_tiny(args.out)
    else:
        path = ensure_tiny_model(rebuild=args.rebuild, log=print)
        print(f"tiny stand-in: {path}")


if __name__ == "__main__":
    main()
