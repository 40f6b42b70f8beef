"""The rollout engine (gpu_engine/rollout_engine.py) against the model it runs, on the tiny stand-in in fp32.

On a CPU the engine runs eagerly; where a CUDA GPU is present every test runs again there, with the decode step
captured and replayed as a CUDA graph, to the same tolerances.
"""

import pandas as pd
import pytest
import torch

import harmony
import model_loader
from lora_fixtures import EXPERT_PARAMETERS, HARMONY_CSV, perturb_lora_b
from gpu_engine import rollout_engine
from gpu_engine.decode_step import nucleus, route
from gpu_engine.rollout_engine import RolloutEngine, cut_at_stop, packs_of

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    return model_loader.load_tokenizer("tiny")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    prompts = pd.read_csv(HARMONY_CSV, keep_default_na=False)["prompt"].tolist()[:5]
    ids = tokenizer(text=prompts)["input_ids"]
    # one prompt longer than the sliding window (128), so the sliding layer's mask is exercised in the prefill too
    return ids + [ids[0][:-3] + ids[1]]


def make_model(expert_lora, device, scale=0.05, experts_format="bf16"):
    from peft import LoraConfig, get_peft_model

    from gpu_engine import expert_lora as expert_lora_module

    torch.manual_seed(0)
    model = get_peft_model(model_loader.load_model("tiny", device=device, dtype=torch.float32,
                                                   experts_format=experts_format),
                           expert_lora_module.register(LoraConfig(
                               r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                               target_parameters=EXPERT_PARAMETERS if expert_lora else None)))
    perturb_lora_b(model, scale)
    return model.to(device)


def forward_logprobs(model, prompt, completion, temperature=1.0):
    """Log-probabilities of `completion` after `prompt` from one plain forward pass, as GRPO's loss computes them."""
    with torch.no_grad():
        return forward_logprobs_with_grad(model, prompt, completion, temperature).float().cpu()


def forward_logprobs_with_grad(model, prompt, completion, temperature=1.0):
    logits = model(torch.tensor([prompt + completion], device=model.device)).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(
        1, torch.tensor(completion, device=model.device)[:, None])[:, 0]


@pytest.mark.parametrize("expert_lora", [False, True], ids=["attention-lora", "expert-lora"])
def test_greedy_tokens_equal_model_generate(tokenizer, prompt_ids, expert_lora, device):
    model = make_model(expert_lora, device)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS]
    completions, _ = RolloutEngine(model, tokenizer).generate(prompt_ids, 48, greedy=True)
    for ids, completion in zip(prompt_ids, completions):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 do_sample=False, max_new_tokens=48, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
        assert completion == out[0, len(ids):].tolist()
    assert max(len(ids) + len(c) for ids, c in zip(prompt_ids, completions)) > 128 + 16  # decode crossed the window


@pytest.mark.parametrize("expert_lora", [False, True], ids=["attention-lora", "expert-lora"])
def test_sampled_logprobs_equal_the_models_forward(tokenizer, prompt_ids, expert_lora, device):
    model = make_model(expert_lora, device)
    torch.manual_seed(1)
    prompts = [prompt_ids[0]] * 4 + [prompt_ids[-1]] * 4
    completions, logprobs = RolloutEngine(model, tokenizer).generate(prompts, 40, temperature=0.7)
    assert len({tuple(c) for c in completions}) > 2  # samples of one prompt differ
    for ids, completion, lps in zip(prompts, completions, logprobs):
        expected = forward_logprobs(model, ids, completion, temperature=0.7)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)


def test_an_optimiser_step_is_seen_by_the_kept_state_without_rebuilding_it(tokenizer, prompt_ids, device):
    model = make_model(expert_lora=True, device=device)
    engine = RolloutEngine(model, tokenizer)
    prompts = [prompt_ids[2]] * 4
    torch.manual_seed(2)
    completions, before = engine.generate(prompts, 32)
    state = next(iter(engine.graphs.values()))
    assert (state.graph is not None) == (device == "cuda")
    addresses = [t.data_ptr() for t in engine.weights.tensors()]  # what a captured graph reads
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimiser = torch.optim.AdamW(lora, lr=0.05)
    loss = -sum(forward_logprobs_with_grad(model, prompts[0], completions[0]))
    loss.backward()
    optimiser.step()  # in place, as the trainer's optimiser does
    after = [forward_logprobs(model, prompts[0], c) for c in completions]
    assert max((a - torch.tensor(b)).abs().max().item() for a, b in zip(after, before)) > 1e-2  # the step mattered
    torch.manual_seed(2)
    completions_after, logprobs_after = engine.generate(prompts, 32)
    assert list(engine.graphs.values()) == [state]  # same buffers, nothing rebuilt
    assert [t.data_ptr() for t in engine.weights.tensors()] == addresses  # the new values copied into the same place
    for completion, lps in zip(completions_after, logprobs_after):
        torch.testing.assert_close(torch.tensor(lps), forward_logprobs(model, prompts[0], completion), atol=1e-4,
                                   rtol=0)


def test_disabling_the_adapter_switches_to_the_base_model(tokenizer, prompt_ids, device):
    model = make_model(expert_lora=True, device=device, scale=0.5)
    engine = RolloutEngine(model, tokenizer)
    with_adapter, _ = engine.generate(prompt_ids, 24, greedy=True)
    with model.disable_adapter():
        without, _ = engine.generate(prompt_ids, 24, greedy=True)
        base = make_model(expert_lora=False, device=device, scale=0.0)  # zero LoRA B: the base model's own tokens
        expected, _ = RolloutEngine(base, tokenizer).generate(prompt_ids, 24, greedy=True)
    assert without == expected
    assert with_adapter != without
    assert len(engine.graphs) == 2  # one state per adapter setting, each kept


def test_completions_stop_at_a_stop_token_and_carry_no_padding(tokenizer, prompt_ids, device):
    model = make_model(expert_lora=False, device=device)
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS}
    torch.manual_seed(3)
    completions, logprobs = RolloutEngine(model, tokenizer).generate(prompt_ids * 3, 64)
    ended = 0
    for completion, lps in zip(completions, logprobs):
        assert len(completion) == len(lps) <= 64
        assert not stop_ids & set(completion[:-1])  # nothing after a stop token
        assert tokenizer.pad_token_id not in completion[:-1]
        ended += completion[-1] in stop_ids
    assert ended >= len(completions) - 2  # the stand-in answers well within 64 tokens


def test_an_unknown_experts_path_is_refused_by_name(tokenizer):
    with pytest.raises(ValueError, match="experts must be 'auto', 'dense' or 'module', not 'grouped'"):
        RolloutEngine(make_model(expert_lora=False, device="cpu"), tokenizer, experts="grouped")


def test_cut_at_stop_keeps_the_stop_token_and_drops_what_follows():
    completions, logprobs = cut_at_stop([[5, 6, 9, 0, 0], [5, 6, 7]], [[-1, -2, -3, 0, 0], [-1, -2, -3]], [9])
    assert completions == [[5, 6, 9], [5, 6, 7]]
    assert logprobs == [[-1, -2, -3], [-1, -2, -3]]


def test_the_decode_router_picks_what_topk_picks_and_weighs_as_the_router_does():
    """route (counting the experts ahead of each) against transformers' router (torch.topk, softmax of the top
    values) on random logits, and on ties: the lower index wins, as torch.topk's CUDA kernel picks
    (test_rollout_engine_gpu.py checks that on a GPU)."""
    torch.manual_seed(0)
    experts, top_k = 32, 4
    h = torch.randn(64, 16)
    weight, bias = torch.randn(experts, 16), torch.randn(experts)
    logits = torch.nn.functional.linear(h, weight, bias)
    top, index = torch.topk(logits, top_k, dim=-1)
    expected = torch.zeros_like(logits).scatter(1, index, torch.softmax(top, dim=1))
    routing = route(h, weight, bias, top_k)
    assert torch.equal(routing > 0, expected > 0)
    # the logits as a reduction (linear_as_reduction): fp32 sums in another order than the matmul's
    torch.testing.assert_close(routing, expected, rtol=1e-5, atol=1e-6)
    # a tie across the k-th place: experts 3, 5 and 9 share the 2nd-largest logit, so with k = 3 the later one drops
    tie_weight = torch.zeros(10, 1)
    tie_weight[[3, 5, 9], 0], tie_weight[7, 0] = 1.0, 2.0
    routing = route(torch.ones(1, 1), tie_weight, torch.zeros(10), 3)
    assert routing[0].nonzero().flatten().tolist() == [3, 5, 7]
    assert routing.sum().item() == pytest.approx(1.0)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    kept = nucleus(probs, torch.tensor([[0.75], [0.5]]))
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]]))


def test_sampling_follows_the_distribution(tokenizer, prompt_ids, device):
    """The exponential race draws tokens with the model's probabilities: first tokens over many rows."""
    model = make_model(expert_lora=False, device=device, scale=0.0)
    prompt = prompt_ids[0] + tokenizer("<|channel|>final<|message|>[", add_special_tokens=False)["input_ids"]
    torch.manual_seed(4)
    completions, _ = RolloutEngine(model, tokenizer).generate([prompt] * 256, 1, temperature=1.0)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt], device=device)).logits[0, -1].float(), dim=-1).cpu()
    counts = torch.bincount(torch.tensor([c[0] for c in completions]), minlength=probs.shape[0]).float() / 256
    top = probs.topk(4).indices
    assert (counts[top] - probs[top]).abs().max() < 0.1


def test_on_a_cpu_the_engine_samples_the_very_tokens_generate_samples(tokenizer, prompt_ids):
    """Same seed, same tokens: transformers' sampling (torch.multinomial) is the same exponential race over the same
    random stream, so on a CPU the engine can replace `generate` in the main job without changing a single sample."""
    model = make_model(expert_lora=False, device="cpu")
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS]
    rows = [prompt_ids[0]] * 4 + [prompt_ids[1]] * 4  # two GRPO groups, in order, as the trainer hands them over
    torch.manual_seed(7)
    completions, _ = RolloutEngine(model, tokenizer).generate(rows, 40, temperature=1.0)
    encoded = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt")
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    expected, _ = cut_at_stop(out[:, encoded["input_ids"].shape[1]:].tolist(), [[0.0] * 40] * 8, stop_ids)
    assert completions == expected
    assert len({tuple(c) for c in completions}) > 2  # sampled, not one repeated answer


def test_grpo_trains_through_the_engine(tmp_path):
    """train_grpo.py with --generation-backend engine: TRL's rollout_func path, a group per prompt, evaluation too."""
    import json

    import train_grpo

    out = tmp_path / "run"
    train_grpo.main(["--tiny", "--total-steps", "2", "--save-steps", "2", "--report-to", "none", "--eval-samples", "1",
                     "--eval-max-prompts", "4", "--generation-backend", "engine", "--out", str(out)])
    prompts, generations = train_grpo.TINY_SETTINGS["PROMPTS_PER_STEP"], train_grpo.TINY_SETTINGS["NUM_GENERATIONS"]
    log = pd.read_csv(out / "completions.csv")
    assert sorted(log["step"].unique().tolist()) == [1, 2]
    assert (log.groupby("step")["prompt_id"].nunique() == prompts).all()  # one group per prompt
    assert (log.groupby(["step", "prompt_id"]).size() == generations).all()
    assert len(log) == 2 * prompts * generations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation_backend"] == "engine" and summary["held_out"]["prompts"] == 4


@pytest.mark.parametrize("expert_lora,experts_format", [(False, "bf16"), (True, "bf16"), (False, "mxfp4"),
                                                       (True, "mxfp4")],
                         ids=["attention-lora", "expert-lora", "mxfp4-experts", "mxfp4-expert-lora"])
def test_the_compiled_decode_functions_compute_what_the_plain_ones_do(tokenizer, prompt_ids, expert_lora,
                                                                      experts_format):
    # aot_eager traces the per-layer functions exactly as inductor receives them (whole graphs, no break allowed;
    # MXFP4 experts' matmuls as one opaque operator) and runs the traced ops unfused, so the results must be the
    # same bits
    model = make_model(expert_lora, "cpu", experts_format=experts_format)
    results = []
    for backend in (None, "aot_eager"):
        engine = RolloutEngine(model, tokenizer, compile_backend=backend)
        torch.manual_seed(4)
        results.append(engine.generate(prompt_ids[:3] * 2, 24, temperature=0.8))
        assert engine.kernels.backend == backend
    assert results[0] == results[1]


def test_a_failing_compiler_is_reported_once_and_the_plain_functions_take_over(tokenizer, prompt_ids, capsys):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C compiler found")

    model = make_model(expert_lora=False, device="cpu")
    torch.manual_seed(5)
    expected = RolloutEngine(model, tokenizer, compile_backend=None).generate(prompt_ids[:2], 16, temperature=0.8)
    engine = RolloutEngine(model, tokenizer, compile_backend=broken_backend)
    torch.manual_seed(5)
    assert engine.generate(prompt_ids[:2], 16, temperature=0.8) == expected
    assert engine.kernels.backend is None
    message = capsys.readouterr().out
    assert message.count("torch.compile") == 1 and "no C compiler found" in message


def test_a_failing_attention_kernel_is_reported_once_and_the_plain_attention_takes_over(tokenizer, prompt_ids,
                                                                                         capsys):
    # the Triton attention kernel cannot run here (an fp32 model on a CPU): as where triton cannot compile, the
    # engine says so once and decodes with the plain attention, the same tokens
    model = make_model(expert_lora=False, device="cpu")
    torch.manual_seed(5)
    expected = RolloutEngine(model, tokenizer, compile_backend=None).generate(prompt_ids[:2], 16, temperature=0.8)
    engine = RolloutEngine(model, tokenizer, compile_backend=None)
    engine.kernels.triton_kernels = True  # what a bf16 engine on a GPU with triton starts with
    torch.manual_seed(5)
    assert engine.generate(prompt_ids[:2], 16, temperature=0.8) == expected
    assert not engine.kernels.triton_kernels
    message = capsys.readouterr().out
    assert message.count("the Triton kernels (attention, experts' combine) failed") == 1
    assert "decode_attention" in message


def test_prompts_are_packed_into_passes_of_at_most_the_budget():
    prompts = [([1] * n, [k]) for k, n in enumerate((5, 3, 4, 9, 2))]
    packs = packs_of(prompts, 8)
    assert [[len(ids) for ids, _ in pack] for pack in packs] == [[5, 3], [4], [9], [2]]  # a longer prompt alone
    assert [rows for pack in packs for _, rows in pack] == [[k] for k in range(5)]


def test_a_prefill_in_several_packs_samples_what_one_pack_samples(tokenizer, prompt_ids, monkeypatch):
    # prompts of different lengths (one past the sliding window), each attending only to itself in a packed pass
    model = make_model(expert_lora=True, device="cpu")
    prompts = [ids for ids in prompt_ids for _ in range(2)]
    assert sum(len(ids) for ids in prompt_ids) <= rollout_engine.PREFILL_PACK_TOKENS  # the first: one pass
    results = []
    for budget in (rollout_engine.PREFILL_PACK_TOKENS, 1):
        monkeypatch.setattr(rollout_engine, "PREFILL_PACK_TOKENS", budget)
        torch.manual_seed(6)
        results.append(RolloutEngine(model, tokenizer).generate(prompts, 12, temperature=0.8))
    assert results[0][0] == results[1][0]
    for one_pass, alone in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(torch.tensor(one_pass), torch.tensor(alone), atol=1e-5, rtol=0)


def test_a_packed_prefill_through_sink_attention_samples_what_eager_attention_samples(tokenizer, prompt_ids):
    # the GPU's prefill attention (sink_attention, packed: its mask, shapes and head order), here on a CPU in fp32
    from gpu_engine import sink_attention

    model = make_model(expert_lora=False, device="cpu")
    prompts = [ids for ids in prompt_ids for _ in range(2)]
    results = []
    for attention in ("eager", sink_attention.NAME):
        engine = RolloutEngine(model, tokenizer)
        engine.prefill_attention = attention
        torch.manual_seed(7)
        results.append(engine.generate(prompts, 12, temperature=0.8))
    assert results[0][0] == results[1][0]
    for eager, fused in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), atol=1e-5, rtol=0)


def test_an_empty_prompt_is_refused(tokenizer):
    engine = RolloutEngine(make_model(expert_lora=False, device="cpu"), tokenizer)
    with pytest.raises(ValueError, match="prompt 1 of 2 has no tokens: an empty prompt was passed"):
        engine.generate([[1, 2, 3], []], 4)


def test_where_the_attention_kernel_runs_one_cache_of_the_longest_length_serves_shorter_steps(tokenizer):
    """With the decode attention kernel (which reads only each row's keys in range) a step of a shorter length
    bucket reuses the kept longer cache of the same rows, new tokens, sampling and adapters, and a longer one replaces
    it: the engine holds one cache, as training/memory_plan.py counts; without the kernel each bucket keeps its own."""
    engine = RolloutEngine(make_model(False, "cpu"), tokenizer)
    long_key, short_key = (32, 640, 256, "sample", 1), (32, 512, 256, "sample", 1)
    other = (32, 512, 256, "greedy", 1)
    engine.kernels.triton_kernels = True  # as on a GPU with triton (no step runs here)
    long_state = engine._state_for(long_key)
    assert engine._state_for(short_key) is long_state and list(engine.graphs) == [long_key]
    engine._state_for(other)
    assert set(engine.graphs) == {long_key, other}
    longer = engine._state_for((32, 768, 256, "sample", 1))
    assert set(engine.graphs) == {other, (32, 768, 256, "sample", 1)} and longer.length == 768
    engine.release()
    engine.kernels.triton_kernels = False
    assert engine._state_for(short_key) is not engine._state_for(long_key) and len(engine.graphs) == 2


