"""training/packed_scoring.py: a micro-batch's rows packed with each shared prompt once, against TRL's own forward per
row, on the tiny stand-in in fp32 with expert LoRA attending through sink_attention (as on a GPU) and gradient
checkpointing on: the same log-probabilities, entropies, MoE aux loss and LoRA gradients, for left-padded prompts
longer than the sliding window, right-padded completions, rows of shared and of distinct prompts; fewer tokens
through the model; the packing's own layout; rows with holes in their masks left to TRL's path."""

import pytest
import torch

from gpu_engine import sink_attention
from test_grpo_trainer import LAYOUTS, padded_batch, scores_and_gradients, trl_path
from test_rollout_engine import make_model
from training import packed_scoring


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig

    import model_loader
    import train_grpo
    from training.grpo_trainer import TesGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("out")), use_cpu=True, report_to=[],
                      per_device_train_batch_size=6, num_generations=3, temperature=0.7, bf16=False,
                      **train_grpo.checkpointing_fields(True))
    model = make_model(expert_lora=True, device="cpu")
    model.get_base_model().set_attn_implementation(sink_attention.NAME)
    trainer = TesGRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0], args=args,
                             train_dataset=Dataset.from_dict({"prompt": ["a"] * 6}),
                             processing_class=model_loader.load_tokenizer("tiny"), generation_backend="generate",
                             base_model_id="tiny")
    # as the Trainer does when it starts training (transformers renamed the method; 5.17 has only the old name)
    if hasattr(trainer.model, "activation_checkpointing_enable"):
        trainer.model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in trainer.model.get_base_model().model.layers)
    trainer.model.train()
    return trainer


@pytest.fixture
def shared_prompts(monkeypatch):
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "1")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_rows_score_as_trls_forward_per_row(trainer, layout, shared_prompts):
    expected = scores_and_gradients(trainer, trl_path(trainer), LAYOUTS[layout])
    got = scores_and_gradients(trainer, trainer._get_per_token_logps_and_entropies, LAYOUTS[layout])

    kept = expected[4]
    assert got[0].shape == expected[0].shape == (6, 9)
    torch.testing.assert_close(got[2], expected[2])  # the MoE load-balancing loss, each shared token weighed
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][kept], expected[1][kept], atol=1e-5, rtol=1e-5)
    assert (got[0][~kept] == 0).all() and (got[1][~kept] == 0).all()
    assert expected[0][kept].std() > 0.1  # real, varied log-probabilities, not a degenerate batch
    assert set(got[3]) == set(expected[3]) and any("experts" in name for name in got[3])
    for name, grad in expected[3].items():
        torch.testing.assert_close(got[3][name], grad, atol=1e-4, rtol=1e-5, msg=name)
        assert grad.abs().sum() > 0 or "lora_A" in name, name
    # one packed sequence per chunk of 3 rows (TRL: a row each)
    assert got[5] == [1, 1] and expected[5] == [3, 3]


def test_a_packed_chunk_runs_each_shared_prompt_once():
    pad = 0
    input_ids, attention_mask, completion_mask = padded_batch(pad, LAYOUTS["groups"])
    chunk = slice(0, 3)  # rows of prompts 0, 1, 0
    packed = packed_scoring.pack_rows(input_ids[chunk], attention_mask[chunk], 9)
    prompt_tokens = attention_mask[chunk, :140].sum(dim=1).tolist()  # 140, 120, 140
    completions = completion_mask[chunk].sum(dim=1).tolist()  # 9, 7, 1
    # prompt 0 once for rows 0 and 2 (all but its last token), prompt 1 once; each row its last prompt token and
    # completion
    assert packed.input_ids.shape[1] == (prompt_tokens[0] - 1) + (prompt_tokens[1] - 1) + sum(completions) + 3
    assert packed.layout.group_rows == (2, 1)
    assert packed.token_weights[0, :prompt_tokens[0] - 1].eq(2).all()  # the shared prefix stands for 2 rows
    # every scored position predicts its row's completion token, and restarts its position after the prompt
    for row in range(3):
        n = completions[row]
        where = packed.score_index[row, :n]
        assert packed.score_valid[row].sum() == n
        assert packed.shift_labels[0, where].tolist() == input_ids[chunk][row, 140:140 + n].tolist()
        assert packed.position_ids[0, where].tolist() == list(range(prompt_tokens[row] - 1, prompt_tokens[row] - 1 + n))
    # the token before each row's first scored one is its prompt's last token
    first = packed.score_index[:, 0]
    assert packed.input_ids[0, first].tolist() == input_ids[chunk][:, 139].tolist()


def test_rows_with_holes_in_their_masks_are_left_to_trls_path(trainer, shared_prompts):
    input_ids, attention_mask, _ = padded_batch(trainer.processing_class.pad_token_id, LAYOUTS["groups"])
    assert packed_scoring.applies(trainer.model, attention_mask, 9)
    holed = attention_mask.clone()
    holed[0, 145] = 0  # a masked token inside a completion
    assert not packed_scoring.applies(trainer.model, holed, 9)
    holed = attention_mask.clone()
    holed[3, 50] = 0  # inside a prompt
    assert not packed_scoring.applies(trainer.model, holed, 9)


def test_the_choice_is_off_by_default_and_a_bad_value_is_refused(trainer, monkeypatch):
    monkeypatch.delenv(packed_scoring.SHARED_PROMPTS_VARIABLE, raising=False)
    assert packed_scoring.shared_prompts_enabled() is packed_scoring.SHARED_PROMPTS is False
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "yes")
    with pytest.raises(ValueError, match="GPT_OSS_SHARED_PROMPTS='yes'"):
        packed_scoring.shared_prompts_enabled()
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "1")
    eager = make_model(expert_lora=False, device="cpu")  # a CPU's eager attention cannot read the packed layout
    _, attention_mask, _ = padded_batch(0, LAYOUTS["groups"])
    assert not packed_scoring.applies(eager, attention_mask, 9)
