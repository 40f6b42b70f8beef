"""Every change this project makes to TRL's GRPOTrainer, in one subclass, and the internals it relies on, checked.

    trainer = TesGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=..., processing_class=...,
                             generation_backend="engine", base_model_id="tiny")     # train_grpo.make_trainer

What it changes (each by overriding the method the documented way, never by assigning to an instance):
- `_get_per_token_logps_and_entropies`: where packed_scoring.why_not finds nothing (its SHARED_PROMPTS on, a model
  attending through sink_attention), each micro-batch packed into one sequence with each shared prompt once; else on
  a CPU, completion_scoring.py scores a GRPO group's prompt once and projects only the completion positions; on
  every other device, a model wrapped for several processes and multimodal inputs, TRL's own chunked path;
- `_generate`: each step's generation seconds and generated tokens are logged (TRL times generation for wandb
  only), and transformers' continuous batching returning nothing (its out-of-memory) becomes
  generation.GenerationFailed;
- `_save_checkpoint` / `_get_output_dir`: a checkpoint is complete or absent: it is written into a hidden
  `.checkpoint-partial-*` directory in OUT and renamed into place when done, its adapter naming a base that another
  checkout finds again (run_directory.record_base); under `accelerate launch` every process writes its part there
  and the main process renames it once all are done;
- `_load_optimizer_and_scheduler`: a run of several CPU processes (gloo) resumes under transformers 5.17 too, whose
  Trainer asks torch.load for the indexed device 'cpu:0', which it cannot restore;
- `_calculate_rewards`: after TRL scores a batch, every completion is written to completions.csv
  (completion_log.CompletionLog) with its parsed action and reward: the rewards only score;
- `log`: a metric with no value in the window (a reward no completion earned: TRL would log None, which
  TensorBoard refuses with a warning per step) is left out; the mean reward of such a step is absent, not zero.
Generation, the log-probabilities (with and without gradient) and the rewards run inside torch.profiler ranges
named in PROFILER_RANGES (free when no profiler runs), so that benchmarks/profile_grpo_step.py can say where a step's
time goes.
`save_checkpoint_now()` is the public way to save one (train_grpo.py on Ctrl-C).

library_internals.TRAINER lists every private TRL / transformers name used here; a trainer checks them when it is
built and stops with one message naming the missing or changed one, the installed versions and the tested ones,
instead of training on with a silently different behaviour.
"""

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from trl import GRPOTrainer

import library_internals
from library_internals import LibraryMismatch  # noqa: F401  (what a failed check raises)
from training import completion_scoring, generation, memory_plan, packed_scoring, rewards, run_directory


PROFILER_RANGES = {  # part of a step -> the torch.profiler range it runs in
    "generation": "grpo/generation",
    "log-probabilities without gradient": "grpo/log-probabilities without gradient",  # the reference model's (and
    "log-probabilities for the loss": "grpo/log-probabilities for the loss",           #   the old policy's)
    "rewards": "grpo/rewards",
}


def check_internals():
    """library_internals.check of everything the subclass relies on (TRAINER)."""
    library_internals.check(library_internals.TRAINER)


class TesGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with this project's changes (see the module docstring)."""

    def __init__(self, *args, generation_backend, base_model_id, memory_phases=None, completion_log=None, **kwargs):
        check_internals()
        self.generation_backend = generation_backend
        self.base_model_id = base_model_id  # what saved adapters record as their base (model_loader.portable_model_id)
        # memory_plan.PhasePeaks: generation is the 'rollout' phase, the rest of a step the phase current around it
        self.memory_phases = memory_phases or memory_plan.PhasePeaks("cpu")
        self.staging_dir = None  # the hidden directory a checkpoint is being written into
        self.completion_log = completion_log  # completion_log.CompletionLog, or None: every scored completion
        self.said_unpacked = False  # whether the run was told that its shared prompts are scored row by row
        super().__init__(*args, **kwargs)

    # -- scoring ---------------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        # a model wrapped for several processes (DDP) must be called through its wrapper, which syncs the gradients
        wrapped = self.accelerator.unwrap_model(model) is not model
        part = "log-probabilities for the loss" if torch.is_grad_enabled() else "log-probabilities without gradient"
        with torch.profiler.record_function(PROFILER_RANGES[part]):
            plain = not wrapped and all(x is None for x in extra.values())
            unpacked = (packed_scoring.why_not(model, attention_mask, logits_to_keep) if plain
                        else "a model wrapped for several processes, or extra inputs")
            if unpacked is None:
                return packed_scoring.score_rows(model, input_ids, attention_mask, logits_to_keep,
                                                 batch_size or input_ids.size(0), compute_entropy, compute_aux_loss,
                                                 self.accelerator.autocast)
            if packed_scoring.shared_prompts_enabled() and not self.said_unpacked:  # asked for, not taken: say so once
                print(f"shared prompts: scoring row by row instead ({unpacked})", file=sys.stderr, flush=True)
                self.said_unpacked = True
            if input_ids.device.type != "cpu" or not plain:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
            return completion_scoring.score_completions(model, input_ids, attention_mask, logits_to_keep,
                                                        batch_size or input_ids.size(0), self.temperature,
                                                        compute_entropy, compute_aux_loss, self.accelerator.autocast)

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate(self, prompts, *args, **kwargs):
        start = time.perf_counter()
        try:
            with self.memory_phases.phase("rollout"), torch.profiler.record_function(PROFILER_RANGES["generation"]):
                result = super()._generate(prompts, *args, **kwargs)
        except Exception as error:
            failure = generation.failure_of(self.generation_backend, error)
            if failure is None:
                raise
            raise failure from error
        self._log_metric("timing/generation_seconds", time.perf_counter() - start)
        self._log_metric("timing/generated_tokens", float(sum(len(ids) for ids in result[1])))
        return result

    # -- rewards ---------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with torch.profiler.record_function(PROFILER_RANGES["rewards"]):
            result = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.completion_log is not None:  # every process's rows, gathered to the main process's writer
                texts, actions, action_rewards = rewards.score_actions(
                    self.processing_class, completion_ids_list, [example["action_rewards"] for example in inputs])
                self.completion_log.write_batch(self.state, [example.get("prompt_id", "") for example in inputs],
                                                texts, actions, action_rewards,
                                                [example.get("optimal_action", "") for example in inputs])
        return result

    # -- checkpoints, complete or absent ---------------------------------------------------------------------------
    def _get_output_dir(self, trial=None):
        return str(self.staging_dir) if self.staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        out, processes = Path(self.args.output_dir), self.accelerator
        staging = [tempfile.mkdtemp(prefix=run_directory.PARTIAL, dir=out) if processes.is_main_process else None]
        if processes.num_processes > 1:
            broadcast_object_list(staging)
        self.staging_dir = Path(staging[0])
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self.staging_dir = self.staging_dir, None
        processes.wait_for_everyone()
        if not processes.is_main_process:
            return
        name = f"checkpoint-{self.state.global_step}"
        run_directory.record_base(staging / name, self.base_model_id)
        run_directory.follow_umask(staging / name)  # the safetensors writer's 0600, mkdtemp's 0700
        run_directory.replace_path(staging / name, out / name, staging)
        shutil.rmtree(staging)

    def _load_optimizer_and_scheduler(self, checkpoint):
        args = self.args
        if checkpoint is None or args.world_size == 1 or args.device.type != "cpu" or args.device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # several CPU processes: transformers 5.17 maps the optimiser's state to the process's indexed device ('cpu:0'),
        # which torch.load cannot restore; later releases map it to 'cpu', as done here

        self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def save_checkpoint_now(self):
        """A checkpoint of the current step (complete or absent, like every other)."""
        self._save_checkpoint(self.model, trial=None)

    # -- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, values in list(metrics.items()):
            if values and all(math.isnan(v) for v in values):
                del metrics[key]  # no completion earned this reward in the window: no value, rather than None
        super().log(logs, *args, **kwargs)
