import pytest
import torch
from conftest import random_model

import minimind.inference.generate as decoding
from minimind.inference.generate import generate, generate_tensors, stream_batch, stream_generate
from minimind.inference.sampling import RowSampler, SamplingParams

PROMPTS = [[5, 17, 99, 1024, 7, 300], [42, 8], [6000, 12, 13, 14]]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_batched_generation_equals_one_prompt_at_a_time(preset):
    model = random_model(preset)
    batched = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    single = [generate(model, [prompt], max_new_tokens=12, stop_token_ids=[])[0] for prompt in PROMPTS]
    assert batched == single
    assert len({tuple(tokens) for tokens in batched}) == len(PROMPTS)  # not a degenerate constant output


def test_greedy_tokens_are_identical_with_and_without_cache(tiny_model):
    cached = generate(tiny_model, PROMPTS, max_new_tokens=10, stop_token_ids=[])
    recomputed = generate(tiny_model, PROMPTS, max_new_tokens=10, stop_token_ids=[], use_cache=False)
    assert cached == recomputed


def test_greedy_follows_the_argmax_of_the_full_forward(tiny_model):
    tokens = generate(tiny_model, [PROMPTS[0]], max_new_tokens=5, stop_token_ids=[])[0]
    sequence = list(PROMPTS[0])
    for token in tokens:
        with torch.no_grad():
            assert tiny_model(torch.tensor([sequence])).logits[0, -1].argmax().item() == token
        sequence.append(token)


def test_generation_stops_at_a_stop_token_and_excludes_it(tiny_model):
    free = generate(tiny_model, [PROMPTS[0]], max_new_tokens=10, stop_token_ids=[])[0]
    stop = free[3]
    first_stop = free.index(stop)
    stopped = generate(tiny_model, [PROMPTS[0]], max_new_tokens=10, stop_token_ids=[stop])[0]
    assert stopped == free[:first_stop]


def test_a_finished_row_stops_while_others_continue(tiny_model):
    free = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_token_ids=[])
    stop = free[1][2]
    outputs = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_token_ids=[stop])
    for row, tokens in enumerate(free):
        expected = tokens[: tokens.index(stop)] if stop in tokens else tokens
        assert outputs[row] == expected


def test_default_stop_is_the_models_eos(tiny_model):
    steps = list(stream_batch(tiny_model, [PROMPTS[0]], SamplingParams(max_new_tokens=6)))
    assert all(token != tiny_model.config.eos_token_id for (token,) in steps)


def test_stream_yields_the_same_tokens_as_generate(tiny_model):
    params = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.95, seed=3, stop_token_ids=[])
    assert list(stream_generate(tiny_model, PROMPTS[2], params)) == generate(tiny_model, [PROMPTS[2]], params)[0]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_model):
    kwargs = dict(max_new_tokens=12, temperature=1.5, stop_token_ids=[])
    assert generate(tiny_model, PROMPTS, seed=7, **kwargs) == generate(tiny_model, PROMPTS, seed=7, **kwargs)
    assert generate(tiny_model, PROMPTS, seed=7, **kwargs) != generate(tiny_model, PROMPTS, seed=8, **kwargs)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model):
    greedy = generate(tiny_model, PROMPTS, max_new_tokens=6, stop_token_ids=[])
    assert generate(tiny_model, PROMPTS, max_new_tokens=6, stop_token_ids=[], temperature=2.0, top_k=1, seed=0) == greedy
    assert generate(tiny_model, PROMPTS, max_new_tokens=6, stop_token_ids=[], temperature=2.0, top_p=1e-6, seed=0) == greedy


def test_top_k_and_top_p_only_sample_from_the_kept_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top2 = RowSampler([SamplingParams(temperature=1.0, top_k=2)] * len(logits), shared=generator)(logits, None)
    assert set(top2.tolist()) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two tokens, 0.9 the first three
    assert set(
        RowSampler([SamplingParams(temperature=1.0, top_p=0.8)] * len(logits), shared=generator)(logits, None).tolist()
    ) == {0, 1}
    assert set(
        RowSampler([SamplingParams(temperature=1.0, top_p=0.9)] * len(logits), shared=generator)(logits, None).tolist()
    ) == {0, 1, 2}


def test_each_row_samples_with_its_own_settings_and_random_stream():
    """One batch, four settings: greedy, top-k 2, top-p 0.8 (found among the best candidates) and top-p
    0.9999 over a flat tail (which needs the whole sorted vocabulary); a seeded row's tokens do not
    depend on which rows share its batch."""
    peaked = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0] + [-9.0] * 195)
    flat = torch.zeros(200)
    logits = torch.stack([peaked, peaked, peaked, flat])
    rows = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.0, top_p=0.9999),
    ]
    sampler = RowSampler(rows, shared=torch.Generator().manual_seed(0))
    picks = torch.stack([sampler(logits, None) for _ in range(3000)])
    assert set(picks[:, 0].tolist()) == {0} and set(picks[:, 1].tolist()) == {0, 1} and set(picks[:, 2].tolist()) == {0, 1}
    assert len(set(picks[:, 3].tolist())) > 150  # the flat row keeps (nearly) its whole vocabulary
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=5)
    alone = RowSampler([seeded], [torch.Generator().manual_seed(5)])
    company = RowSampler([rows[3], seeded, rows[1]], [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)])
    tail = torch.stack([flat, peaked + torch.linspace(0, 1, 200), peaked])
    assert [alone(tail[1:2], None).item() for _ in range(50)] == [company(tail, None)[1].item() for _ in range(50)]


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert RowSampler([SamplingParams()])(logits, seen).item() == 0
    assert RowSampler([SamplingParams(repetition_penalty=1.3)])(logits, seen).item() == 1


def test_invalid_sampling_values_are_refused(tiny_model):
    for bad in (
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_new_tokens=-1),
        dict(repetition_penalty=0),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny_model, [[]])


def test_generation_never_runs_past_the_context_window():
    model = random_model(max_position_embeddings=32)
    tokens = generate(model, [list(range(3, 23))], max_new_tokens=100, stop_token_ids=[])[0]
    assert len(tokens) == 12
    with pytest.raises(ValueError, match="no room"):
        generate(model, [list(range(3, 35))])


def test_generate_restores_training_mode(tiny_model):
    tiny_model.train()
    generate(tiny_model, [PROMPTS[1]], max_new_tokens=2)
    assert tiny_model.training


def test_generate_takes_and_returns_tensors_as_transformers_does(tiny_model):
    """input_ids + attention_mask (left or right padding) -> prompt + new ids, right-padded with pad."""
    lists = generate(tiny_model, PROMPTS, max_new_tokens=6, stop_token_ids=[3])
    width = max(map(len, PROMPTS))
    left = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(left)
    for row, prompt in enumerate(PROMPTS):
        left[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    out = generate_tensors(tiny_model, left, attention_mask=mask, max_new_tokens=6, stop_token_ids=[3], do_sample=False)
    assert out.shape == (len(PROMPTS), width + max(map(len, lists)))
    assert torch.equal(out[:, :width], left)
    for row, new in enumerate(lists):
        assert out[row, width:].tolist() == new + [tiny_model.config.pad_token_id] * (out.shape[1] - width - len(new))
    right = torch.stack([torch.tensor(p + [0] * (width - len(p))) for p in PROMPTS])
    again = generate_tensors(tiny_model, right, (right != 0).long(), max_new_tokens=6, stop_token_ids=[3])  # right padding
    assert [again[row, width : width + len(new)].tolist() for row, new in enumerate(lists)] == lists


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_the_static_cache_of_cuda_graph_decoding_gives_the_same_tokens(preset, monkeypatch):
    """`compile_for_decoding` on CUDA decodes every batch over a static KV cache; run eagerly here, that path
    must give exactly the tokens of the ordinary cache, left padding included."""
    model = random_model(preset)
    prompts = [[5, 9, 33, 7, 2001, 12], [44, 3], [8, 8, 8, 8]]
    ordinary = generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    monkeypatch.setattr(decoding, "uses_cuda_graphs", lambda device: True)
    model.compiled_decode_step = model.forward  # what torch.compile wraps, uncompiled
    assert generate(model, prompts, max_new_tokens=10, stop_token_ids=[]) == ordinary


def test_cuda_graph_decoding_traces_one_graph_for_every_position(monkeypatch):
    """Fixed shapes: the compiled step is traced once and reused at every position (a recompilation per
    token would make CUDA graphs useless). Dynamo traces for real; the graph runs eagerly."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    monkeypatch.setattr(decoding, "uses_cuda_graphs", lambda device: True)
    model = random_model("tiny")
    counter = CompileCounter()
    model.compiled_decode_step = torch.compile(model.forward, backend=counter, dynamic=False)
    expected = generate(random_model("tiny"), [[5, 9, 33], [7, 1]], max_new_tokens=12, stop_token_ids=[])
    assert generate(model, [[5, 9, 33], [7, 1]], max_new_tokens=12, stop_token_ids=[]) == expected
    assert counter.frame_count == 1
    generate(model, [[5, 9, 33, 4, 4], [7, 1]], max_new_tokens=12, stop_token_ids=[])  # another prompt length, same cache bucket
    assert counter.frame_count == 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_one_row_steps_over_the_whole_cache_give_the_same_tokens(preset):
    """On CPU a compiled step decodes one row over a static view of the ordinary cache (`WholeCacheSteps`);
    run eagerly here, it gives exactly the ordinary tokens, at batch 1 only (batches stay eager)."""
    model = random_model(preset)
    ordinary = [generate(model, [prompt], max_new_tokens=10, stop_token_ids=[]) for prompt in PROMPTS]
    calls = []

    def step(*args, **kwargs):
        calls.append(kwargs["kv_cache"].static)
        return model.forward(*args, **kwargs)

    model.compiled_decode_step = step
    assert [generate(model, [prompt], max_new_tokens=10, stop_token_ids=[]) for prompt in PROMPTS] == ordinary
    assert calls == [True] * 9 * len(PROMPTS)  # every step after the prefill
    generate(model, PROMPTS, max_new_tokens=10, stop_token_ids=[])
    assert len(calls) == 9 * len(PROMPTS)


def test_one_row_decoding_traces_one_graph_for_every_position_and_cache_size():
    """The cache's length is a dynamic dimension of the compiled one-row step: one trace serves every position,
    prompt length and cache size, in `generate` and in a continuous batch alike."""
    from torch._dynamo.testing import CompileCounter

    from minimind.inference.continuous import ContinuousBatch

    torch._dynamo.reset()
    model = random_model("tiny")
    counter = CompileCounter()
    model.compiled_decode_step = torch.compile(model.forward, backend=counter)
    for prompt in ([5, 9, 33], [7, 1, 4, 4, 4, 4, 4, 8], [2] * 30):
        expected = generate(random_model("tiny"), [prompt], max_new_tokens=12, stop_token_ids=[])
        assert generate(model, [prompt], max_new_tokens=12, stop_token_ids=[]) == expected
    batch = ContinuousBatch(model, stop_token_ids=[])
    batch.add(["a"], [[9, 9, 9, 9, 9]], [SamplingParams(40)])
    while len(batch):
        batch.step()
    assert counter.frame_count == 1


def test_compile_for_decoding_on_cpu_gives_the_eager_tokens_with_one_compiled_graph():
    """The default path of `minimind chat` and Serve on a CPU, compiled for real by inductor: greedy tokens are
    the eager ones, in `generate` and in a continuous batch, and one graph serves every prompt. (fp32: a random
    model's top logits lie close enough for bf16's different summation order to swap them.)"""
    from minimind.inference.continuous import ContinuousBatch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = random_model("tiny")
    eager = [generate(model, [prompt], max_new_tokens=16, stop_token_ids=[])[0] for prompt in PROMPTS]
    assert decoding.compile_for_decoding(model)
    assert [generate(model, [prompt], max_new_tokens=16, stop_token_ids=[])[0] for prompt in PROMPTS] == eager
    batch = ContinuousBatch(model, stop_token_ids=[])
    tokens = batch.add(["a"], [PROMPTS[0]], [SamplingParams(16)])
    while len(batch):
        tokens += [token for _, token in batch.step() if token is not None]
    assert tokens == eager[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_moe_models_and_batches_stay_eager_on_cpu():
    model = random_model("tiny-moe")
    assert not decoding.compile_for_decoding(model)  # routing reads expert counts on the host: a graph break per layer
    assert not hasattr(model, "compiled_decode_step")
    dense = random_model("tiny")
    dense.compiled_decode_step = dense.forward
    assert decoding.compiled_step_for(dense, rows=1) is not None and decoding.compiled_step_for(dense, rows=2) is None
    assert decoding.wants_compile("auto", "cpu") and not decoding.wants_compile("auto", "cuda")
    assert decoding.wants_compile("on", "cuda") and not decoding.wants_compile("off", "cpu")
