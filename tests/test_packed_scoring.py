"""training/packed_scoring.py: a micro-batch's rows packed with each shared prompt once, against TRL's own forward per
row, on the tiny stand-in in fp32 with expert LoRA attending through sink_attention (as on a GPU) and gradient
checkpointing on: the same log-probabilities, entropies, MoE aux loss and LoRA gradients, for left-padded prompts
longer than the sliding window, right-padded completions, rows of shared and of distinct prompts; fewer tokens
through the model; the packing's own layout; rows with holes in their masks left to TRL's path."""

import pytest
import torch

from gpu_engine import sink_attention
from test_grpo_trainer import (LAYOUTS, assert_scores_match, make_trainer, padded_batch, scores_and_gradients,
                               trl_path)
from test_rollout_engine import make_model
from training import packed_scoring


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    model = make_model(expert_lora=True, device="cpu")
    model.get_base_model().set_attn_implementation(sink_attention.NAME)
    trainer = make_trainer(tmp_path_factory, model)
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

    assert_scores_match(got, expected, entropy_tolerance=1e-5)  # the aux loss with each shared token weighed
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


def test_rows_with_holes_in_their_masks_are_left_to_trls_path_and_the_run_is_told_once(trainer, shared_prompts,
                                                                                         capsys):
    input_ids, attention_mask, _ = padded_batch(trainer.processing_class.pad_token_id, LAYOUTS["groups"])
    assert packed_scoring.why_not(trainer.model, attention_mask, 9) is None
    holed = attention_mask.clone()
    holed[0, 145] = 0  # a masked token inside a completion
    assert packed_scoring.why_not(trainer.model, holed, 9) == "a row's attention mask has a hole"
    holed = attention_mask.clone()
    holed[3, 50] = 0  # inside a prompt
    assert packed_scoring.why_not(trainer.model, holed, 9) == "a row's attention mask has a hole"
    rows = []
    hook = trainer.model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
    with torch.no_grad():
        for _ in range(2):
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, holed, 9, batch_size=6)
    hook.remove()
    assert rows == [6, 6]  # TRL's forward of every row
    said = capsys.readouterr().err
    assert said.count("shared prompts: scoring row by row instead (a row's attention mask has a hole)") == 1


def test_the_choice_is_off_by_default_and_a_bad_value_is_refused(trainer, monkeypatch):
    monkeypatch.delenv(packed_scoring.SHARED_PROMPTS_VARIABLE, raising=False)
    assert packed_scoring.shared_prompts_enabled() is packed_scoring.SHARED_PROMPTS is False
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "yes")
    with pytest.raises(ValueError, match="GPT_OSS_SHARED_PROMPTS='yes'"):
        packed_scoring.shared_prompts_enabled()
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "1")
    eager = make_model(expert_lora=False, device="cpu")  # a CPU's eager attention cannot read the packed layout
    _, attention_mask, _ = padded_batch(0, LAYOUTS["groups"])
    assert "does not attend through" in packed_scoring.why_not(eager, attention_mask, 9)
    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "0")
    assert packed_scoring.why_not(trainer.model, attention_mask, 9) == "GPT_OSS_SHARED_PROMPTS is off"


def edge_batch(pad_id):
    """Rows of a one-token prompt and of a 150-token one (left padding), completions of 0, 9, 3 and 1 tokens."""
    generator = torch.Generator().manual_seed(4)
    short, long = torch.randint(0, 900, (1,), generator=generator), torch.randint(0, 900, (150,), generator=generator)
    prompts = torch.full((2, 150), pad_id)
    prompt_masks = torch.zeros(2, 150, dtype=torch.long)
    prompts[0, -1], prompt_masks[0, -1] = short[0], 1
    prompts[1], prompt_masks[1] = long, 1
    layout = [0, 1, 0, 1]
    completion = torch.randint(0, 900, (4, 9), generator=generator)
    completion_mask = torch.zeros(4, 9, dtype=torch.long)
    for row, n in enumerate([0, 9, 3, 1]):
        completion_mask[row, :n] = 1
        completion[row, n:] = pad_id
    return (torch.cat([prompts[layout], completion], 1), torch.cat([prompt_masks[layout], completion_mask], 1),
            completion_mask)


def test_an_empty_completion_and_a_one_token_prompt_score_as_trls_forward(trainer, shared_prompts):
    input_ids, attention_mask, completion_mask = edge_batch(trainer.processing_class.pad_token_id)
    with torch.no_grad():
        expected = trl_path(trainer)(trainer.model, input_ids, attention_mask, 9, batch_size=4, compute_entropy=True,
                                     compute_aux_loss=True)
        got = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 9, batch_size=4,
                                                         compute_entropy=True, compute_aux_loss=True)
    kept = completion_mask.bool()
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][kept], expected[1][kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], expected[2])
    assert (got[0][0] == 0).all() and kept.sum() == 13


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_rows_score_as_trls_forward_on_a_gpu(monkeypatch):
    """The GPU's own path (sink attention through SDPA's memory-efficient kernel, MXFP4 experts, LoRA): in fp32 the
    same log-probabilities, entropies, aux loss and LoRA gradients as TRL's forward per row; in bf16 each path as
    close to fp32 as the other (the two round differently: positions, sums over a shared prefix, the router's top-k
    at near ties)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    import model_loader

    monkeypatch.setenv(packed_scoring.SHARED_PROMPTS_VARIABLE, "1")
    input_ids, attention_mask, completion_mask = (t.cuda() for t in padded_batch(0, LAYOUTS["groups"]))
    kept = completion_mask.bool()
    lora = None
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        base = model_loader.load_model("tiny", device="cuda", dtype=dtype)
        assert sink_attention.attends_through_this(base)
        add_fused_lm_head(base, temperature=0.7, outputs=("log_probs", "entropy"))
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        if lora is None:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.05)
            lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # the same adapter in both dtypes
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(lora[name])

        def trl_forward():
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, :-9] = -100
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        output_router_logits=True)
            return out.log_probs[:, -9:], out.entropy[:, -9:], out.aux_loss

        def packed():
            return packed_scoring.score_rows(model, input_ids, attention_mask, 9, 6, True, True)

        for path, score in (("plain", trl_forward), ("packed", packed)):
            model.zero_grad()
            logps, entropy, aux = score()
            ((logps * completion_mask).sum() + aux).backward()
            grads = torch.cat([p.grad.float().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
            results[path, dtype] = (logps.float().detach()[kept], entropy.float().detach()[kept],
                                    aux.float().detach(), grads)

    def error(got, ref):
        return ((got - ref).norm() / ref.norm()).item()

    fp32, bf16 = torch.float32, torch.bfloat16
    for part, tolerance in ((0, 1e-5), (1, 1e-4), (2, 1e-5), (3, 1e-4)):  # logps, entropy, aux, gradients
        assert error(results["packed", fp32][part], results["plain", fp32][part]) <= tolerance, part
        packed_error = error(results["packed", bf16][part], results["plain", fp32][part])
        plain_error = error(results["plain", bf16][part], results["plain", fp32][part])
        print(f"\npart {part}: bf16 against fp32, packed {packed_error:.2e}, row by row {plain_error:.2e}")
        assert packed_error <= 2 * plain_error + 1e-3, part
