"""training/grpo_trainer.py, TesGRPOTrainer's changes to TRL. Its CPU scoring (training/completion_scoring.py) against
TRL's own chunked LM head, on the tiny stand-in in fp32 with expert LoRA: the same log-probabilities, entropies, MoE
aux loss and LoRA gradients, for left-padded prompts and right-padded completions, with prompts shared between rows
(each run once over a KV cache) and without; continuous batching's empty result named; no None logged; the library
internals it relies on checked by name."""

import pytest
import torch

from test_rollout_engine import make_model


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory, make_model(expert_lora=True, device="cpu"))


def make_trainer(tmp_path_factory, model):
    """A TesGRPOTrainer on the CPU around `model`, 6 rows a batch in groups of 3, temperature 0.7, no rewards."""
    from datasets import Dataset
    from trl import GRPOConfig

    import model_loader
    from training.grpo_trainer import TesGRPOTrainer

    import train_grpo

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("out")), use_cpu=True, report_to=[],
                      per_device_train_batch_size=6, num_generations=3, temperature=0.7, bf16=False,
                      **train_grpo.checkpointing_fields(True))
    return TesGRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 6}),
                          processing_class=model_loader.load_tokenizer("tiny"), generation_backend="generate",
                          base_model_id="tiny")


def trl_path(trainer):
    """TRL's own scoring (the chunked LM head), bound to the trainer: what the subclass replaces on a CPU."""
    from trl import GRPOTrainer

    return GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)


LAYOUTS = {
    # rows 0..5 of two prompts x 3 answers in the order TRL's shuffle may leave them; chunks of 3 rows share prompts
    "groups": [0, 1, 0, 1, 1, 0],
    "distinct": [0, 1, 2, 3, 4, 5],  # nothing shared: one plain forward
}


def padded_batch(pad_id, layout):
    """Rows of 140 prompt tokens (left padding; longer than the 128-token sliding window) and 9 completion tokens
    (right padding), as TRL builds them; rows with the same entry of `layout` share their prompt."""
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 900, (6, 140), generator=generator)
    prompt_masks = torch.ones_like(prompts)
    for row, left in enumerate([0, 20, 3, 0, 7, 1]):
        prompts[row, :left], prompt_masks[row, :left] = pad_id, 0
    completion = torch.randint(0, 900, (6, 9), generator=generator)
    completion_mask = torch.ones_like(completion)
    for row, right in enumerate([0, 2, 8, 4, 0, 1]):
        completion[row, 9 - right:], completion_mask[row, 9 - right:] = pad_id, 0
    return (torch.cat([prompts[layout], completion], 1), torch.cat([prompt_masks[layout], completion_mask], 1),
            completion_mask)


def scores_and_gradients(trainer, score, layout):
    input_ids, attention_mask, completion_mask = padded_batch(trainer.processing_class.pad_token_id, layout)
    trainer.model.zero_grad()
    rows = []
    backbone = trainer.model.get_base_model().model
    hook = backbone.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                              with_kwargs=True)
    logps, entropies, aux = score(trainer.model, input_ids, attention_mask, 9, batch_size=3, compute_entropy=True,
                                  compute_aux_loss=True)
    ((logps * completion_mask).sum() + 100 * aux).backward()  # the aux loss weighted up, so its gradient counts
    hook.remove()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return logps.detach(), entropies.detach(), aux.detach(), grads, completion_mask.bool(), rows


@pytest.mark.parametrize("layout", LAYOUTS)
def test_completion_scores_match_trls_chunked_lm_head(trainer, layout):
    expected = scores_and_gradients(trainer, trl_path(trainer), LAYOUTS[layout])
    got = scores_and_gradients(trainer, trainer._get_per_token_logps_and_entropies, LAYOUTS[layout])

    # the entropy only feeds logging (and TOP_ENTROPY_QUANTILE); TRL folds it online, here it is summed, so the two
    # round differently at low entropy
    assert_scores_match(got, expected, entropy_tolerance=1e-3)
    # rows per forward of the model's backbone: each chunk of 3 rows as one forward, or its 2 prompts then 3 rows
    assert got[5] == {"groups": [2, 3, 2, 3], "distinct": [3, 3]}[layout]


def assert_scores_match(got, expected, entropy_tolerance):
    """`scores_and_gradients` of a scoring path (`got`) against TRL's (`expected`): the same MoE load-balancing
    loss, log-probabilities, entropies (to `entropy_tolerance`) and LoRA gradients, 0 past each completion, on a
    batch whose log-probabilities and gradients are real."""
    kept = expected[4]
    assert got[0].shape == expected[0].shape == (6, 9)
    torch.testing.assert_close(got[2], expected[2])  # the MoE load-balancing loss (gpt-oss: coefficient 0.001)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][kept], expected[1][kept], atol=entropy_tolerance, rtol=entropy_tolerance)
    assert (got[0][~kept] == 0).all() and (got[1][~kept] == 0).all()
    assert expected[0][kept].std() > 0.1  # real, varied log-probabilities, not a degenerate batch
    assert set(got[3]) == set(expected[3]) and any("experts" in name for name in got[3])
    for name, grad in expected[3].items():
        torch.testing.assert_close(got[3][name], grad, atol=1e-4, rtol=1e-5, msg=name)
        assert grad.abs().sum() > 0 or "lora_A" in name, name  # B starts perturbed, so A's gradient need not vanish


def test_entropy_and_aux_loss_are_left_out_unless_asked_for(trainer):
    input_ids, attention_mask, _ = padded_batch(trainer.processing_class.pad_token_id, LAYOUTS["groups"])
    with torch.no_grad():
        logps, entropies, aux = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 9)
    assert logps.shape == (6, 9) and entropies is None and aux is None


def test_rows_shared_by_a_group_backpropagate_in_a_fixed_order():
    # x[index] sums the gradients of a group's rows in the order threads reach them (runs of one seed then part);
    # take_rows must give the same bits every time
    from training.completion_scoring import take_rows

    torch.manual_seed(0)
    x = torch.randn(8, 2, 110, 16, requires_grad=True)
    index = torch.arange(8).repeat_interleave(4)[torch.randperm(32)]
    upstream = torch.randn(32, 2, 110, 16)
    grads = set()
    for _ in range(30):
        x.grad = None
        take_rows(x, index).backward(upstream)
        grads.add(x.grad.numpy().tobytes())
    assert len(grads) == 1
    torch.testing.assert_close(x.grad, torch.zeros_like(x).index_put_((index,), upstream, accumulate=True))


def test_continuous_batching_that_returns_nothing_is_reported_as_such(trainer, monkeypatch):
    """Continuous batching logs its out-of-memory and returns nothing; TRL then fails on the empty result."""
    from trl import GRPOTrainer

    from training.generation import GenerationFailed

    def empty(self, prompts):
        raise IndexError("list index out of range")

    monkeypatch.setattr(GRPOTrainer, "_generate", empty)
    monkeypatch.setattr(trainer, "generation_backend", "continuous-batching")
    with pytest.raises(GenerationFailed, match="continuous batching returned no completions"):
        trainer._generate(["a prompt"])
    monkeypatch.setattr(trainer, "generation_backend", "engine")
    with pytest.raises(IndexError):  # other back ends' errors are not relabelled
        trainer._generate(["a prompt"])


def test_a_step_without_any_reward_logs_no_none(trainer, monkeypatch):
    """A window in which no completion earned the action reward (all NaN): TRL would log None, which TensorBoard
    refuses with a warning each step; the subclass leaves the metric out and keeps the others."""
    logged = []
    monkeypatch.setattr(trainer.callback_handler, "on_log", lambda args, state, control, logs: logged.append(logs))
    trainer._metrics["train"]["rewards/action_reward/mean"] = [float("nan"), float("nan")]
    trainer._metrics["train"]["rewards/format_reward/mean"] = [-1.0, -1.0]
    trainer.model.train()
    trainer.log({"loss": 0.5})
    assert "rewards/action_reward/mean" not in logged[-1] and logged[-1]["rewards/format_reward/mean"] == -1.0
    assert None not in logged[-1].values()


def test_a_missing_or_changed_library_internal_stops_with_its_name(monkeypatch):
    import trl

    from training import grpo_trainer

    grpo_trainer.check_internals()  # the installed versions have every one
    monkeypatch.delattr(trl.GRPOTrainer, "_generate")
    with pytest.raises(grpo_trainer.LibraryMismatch, match=r"trl\.GRPOTrainer\._generate is missing.*tested: trl 1"):
        grpo_trainer.check_internals()
    monkeypatch.undo()
    monkeypatch.setattr(trl.GRPOTrainer, "_log_metric", lambda self, key, number: None)
    with pytest.raises(grpo_trainer.LibraryMismatch, match="_log_metric no longer takes name, value"):
        grpo_trainer.check_internals()
    monkeypatch.undo()
    import library_internals

    library_internals.check(library_internals.ENGINE)  # the engine's, read from the libraries' source
    renamed = (("peft.tuners.lora.layer", None, "_did_swap_in_out_features_renamed"),)
    with pytest.raises(library_internals.LibraryMismatch, match="attribute _did_swap_in_out_features_renamed is never"):
        library_internals.check(renamed)
