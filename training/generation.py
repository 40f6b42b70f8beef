"""Which back end samples the completions, in training and in evaluation: one registry, one 'auto' rule, the
settings TRL needs for it, the errors it raises, and the object that owns its engine.

    backend = generation.resolve("auto", model, "cuda")        # 'engine' for a model the engine runs, else 'generate'
    generator = generation.Generator(backend, model, tokenizer) # held by the run: the engine, made on first use
    GRPOConfig(..., **generation.trl_settings(backend, settings))   # TRL's settings for the back end
    GRPOTrainer(..., rollout_func=generator.rollout_func())         # the engine's rollouts, or None: TRL generates
    completions = generator.sample(prompts, temperature, top_p, max_new_tokens)   # evaluation (the caller seeds torch)
    generator.release()             # let go of the engine's caches and graphs before a phase of other sizes

Back ends (BACKENDS): `engine` (gpu_engine/rollout_engine.py: CUDA graphs on a GPU, eager on a CPU; in training
plugged in as TRL's rollout_func), `generate` (TRL's own generation in training, transformers' `generate` in
evaluation) and `continuous-batching` (TRL's transformers continuous batching in training, a GPU only; evaluation
samples with `generate`). 'auto' takes the engine on a GPU for a model the engine runs (rollout_engine.supports),
else `generate`. Prompts are already rendered Harmony text, so every back end of ours tokenises them without added
special tokens (tokenize_prompts); TRL's own paths tokenise inside TRL. Adding a back end touches this module alone.
"""

import math
import os
from typing import NamedTuple

import torch

import harmony
from gpu_engine.rollout_engine import RolloutEngine, supports


class Backend(NamedTuple):
    needs_cuda: bool  # refused on a CPU
    trains_with_rollout_func: bool  # training plugs it into GRPOTrainer as rollout_func (else TRL generates)
    evaluation_sampler: str  # the BACKENDS entry whose sampler evaluation uses


BACKENDS = {
    "engine": Backend(needs_cuda=False, trains_with_rollout_func=True, evaluation_sampler="engine"),
    "generate": Backend(needs_cuda=False, trains_with_rollout_func=False, evaluation_sampler="generate"),
    "continuous-batching": Backend(needs_cuda=True, trains_with_rollout_func=False, evaluation_sampler="generate"),
}


class GenerationFailed(RuntimeError):
    """Generation gave no usable completions (transformers' continuous batching logs its out-of-memory and returns
    nothing, and TRL then fails on the empty result)."""


def check_backend(name, device):
    """ValueError for a name that is neither 'auto' nor a back end, or one this device cannot run."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"generation back end {name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name != "auto" and BACKENDS[name].needs_cuda and not str(device).startswith("cuda"):
        raise ValueError(f"--generation-backend {name} needs a CUDA GPU; use generate or engine")


def resolve(name, model, device):
    """The back end a name stands for on this model and device ('auto': the engine on a GPU when it runs the model)."""
    check_backend(name, device)
    if name != "auto":
        return name
    return "engine" if str(device).startswith("cuda") and supports(model) else "generate"


def tokenize_prompts(tokenizer, prompts):
    """Token ids of rendered Harmony prompts (no special tokens added: the text holds them all)."""
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def trl_settings(name, settings):
    """GRPOConfig's generation fields for back end `name` and train_grpo.py's settings."""
    batching = name == "continuous-batching"
    return {"use_transformers_continuous_batching": batching,
            "transformers_continuous_batching_config": continuous_batching_config(settings) if batching else None}


def continuous_batching_config(settings):
    """transformers' continuous batching sized to one step's work instead of a share of free GPU memory.

    Its default takes 90 % of the memory left after loading for the KV cache and lets a prefill batch grow until
    the full-vocabulary logits alone ask for 16 GiB: at real prompt lengths on an 80 GB card that runs out of memory.
    Here: enough 256-token blocks for every completion of a step at the longest prompt, and prefill batches of at
    most 2,048 tokens (1.6 GiB of fp32 logits).
    """
    block = 256
    rows = settings["PROMPTS_PER_STEP"] * settings["NUM_GENERATIONS"]
    blocks_per_row = math.ceil((settings["MAX_PROMPT_LEN"] + settings["MAX_COMPLETION_LEN"]) / block)
    return {"block_size": block, "num_blocks": rows * blocks_per_row + 8, "max_batch_tokens": 2048}


def failure_of(name, error):
    """GenerationFailed for an error that means back end `name` produced no completions (continuous batching's
    IndexError / RuntimeError after its out-of-memory), else None (the error stands as it is)."""
    if name != "continuous-batching" or isinstance(error, torch.OutOfMemoryError):
        return None
    if not isinstance(error, (IndexError, RuntimeError)):
        return None
    return GenerationFailed(f"continuous batching returned no completions ({error.__class__.__name__}: {error}); "
                            "its log above says why, usually 'out of memory'")


class Generator:
    """Back end `name` over one model: what training's rollouts and evaluation's answers are sampled with. It owns
    the rollout engine (made on first use, kept between calls so its graphs survive) and lets go of its memory on
    `release`. stop_ids: the tokens a completion ends with (Harmony's by default), for every back end."""

    def __init__(self, name, model, tokenizer, stop_ids=None):
        if name not in BACKENDS:
            raise ValueError(f"Generator takes a back end ({', '.join(BACKENDS)}), not {name!r}: resolve() it first")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.stop_ids = list(stop_ids or harmony.stop_token_ids(tokenizer))
        self.engine = None

    def rollout_engine(self):
        if self.engine is None:
            self.engine = RolloutEngine(self.model, self.tokenizer, stop_ids=self.stop_ids)
        return self.engine

    def rollout_func(self):
        """GRPOTrainer's rollout_func, or None where TRL generates itself."""
        if not BACKENDS[self.name].trains_with_rollout_func:
            return None
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.x

        def rollout(prompts, trainer):
            prompt_ids = tokenize_prompts(self.tokenizer, prompts)
            completions, logprobs = self.rollout_engine().generate(prompt_ids, trainer.max_completion_length,
                                                                   temperature=trainer.temperature,
                                                                   top_p=trainer.top_p)
            return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}

        return rollout

    def sample(self, prompts, temperature, top_p, max_new_tokens):
        """Completion token ids for each prompt, with the back end's evaluation sampler (the caller seeds torch)."""
        if BACKENDS[self.name].evaluation_sampler == "engine":
            completions, _ = self.rollout_engine().generate(tokenize_prompts(self.tokenizer, prompts), max_new_tokens,
                                                            temperature=temperature, top_p=top_p)
            return completions
        model, tokenizer = self.model, self.tokenizer
        device = next(model.parameters()).device
        encoded = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",  # tokenize_prompts',
                            return_tensors="pt").to(device)                                   # padded on the left
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
        return out[:, encoded["input_ids"].shape[1]:].tolist()

    def release(self):
        """Let go of what the engine keeps between calls (captured graphs, their KV caches, weight copies); the next
        call rebuilds them. Validation and evaluation sample at other sizes than training's rollouts: releasing
        before and after them keeps either phase from holding the other's memory (memory_plan.py)."""
        if self.engine is not None:
            self.engine.release()
