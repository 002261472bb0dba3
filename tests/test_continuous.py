"""Continuous batching: rows that join a running batch, or leave it, decode exactly as they would alone."""

import pytest
from conftest import random_model

from minimind.inference.continuous import ContinuousBatch
from minimind.inference.generate import generate
from minimind.inference.sampling import SamplingParams

PROMPTS = {
    "short": [5, 17],
    "long": [6000, 12, 13, 14, 99, 1024, 7, 300, 8],
    "mid": [42, 8, 9, 77],
    "late": [3000, 31, 32, 33, 34, 35],
}


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("one_row_step", ["eager", "whole cache"])
def test_rows_that_join_and_leave_a_running_batch_get_the_tokens_they_get_alone(preset, one_row_step):
    """'whole cache': the batch's one-row steps go through the step a compiled model has (`WholeCacheSteps`,
    here uncompiled), before rows join and after they leave."""
    model = random_model(preset)
    limits = {"short": 12, "long": 5, "mid": 9, "late": 7}
    penalised = {"mid": 1.3}
    params = {name: SamplingParams(limits[name], repetition_penalty=penalised.get(name, 1.0)) for name in PROMPTS}
    alone = {
        name: generate(
            model, [PROMPTS[name]], SamplingParams(limits[name], repetition_penalty=penalised.get(name, 1.0), stop_token_ids=[])
        )[0]
        for name in PROMPTS
    }
    if one_row_step == "whole cache":
        model.compiled_decode_step = model.forward
    batch = ContinuousBatch(model, stop_token_ids=[])
    got = {name: [] for name in PROMPTS}

    def record(pairs):
        for name, token in pairs:
            assert token is not None
            got[name].append(token)

    record(zip(["short"], batch.add(["short"], [PROMPTS["short"]], [params["short"]])))
    record(batch.step())
    # a longer prompt joins (the batch's cache grows on the left) together with a shorter one
    record(zip(["long", "mid"], batch.add(["long", "mid"], [PROMPTS["long"], PROMPTS["mid"]], [params["long"], params["mid"]])))
    for _ in range(3):
        record(batch.step())
    record(zip(["late"], batch.add(["late"], [PROMPTS["late"]], [params["late"]])))
    while len(batch):
        record(batch.step())
    assert got == alone
    assert len(set(map(tuple, alone.values()))) == 4
    assert (batch.compiled_steps is not None) == (one_row_step == "whole cache")


def test_a_row_ends_at_its_stop_token_its_limit_or_when_finished_by_the_caller(tiny_model):
    free = generate(tiny_model, [PROMPTS["long"]], max_new_tokens=8, stop_token_ids=[])[0]
    batch = ContinuousBatch(tiny_model, stop_token_ids=[free[3]])
    first = batch.add(
        ["stops", "limit", "cancelled"],
        [PROMPTS["long"], PROMPTS["short"], PROMPTS["mid"]],
        [SamplingParams(8), SamplingParams(2), SamplingParams(50)],
    )
    tokens = {"stops": [first[0]], "limit": [first[1]], "cancelled": [first[2]]}
    ended = {}
    step = 1
    while len(batch):
        if step == 4:
            batch.finish(["cancelled"])
        for name, token in batch.step():
            if token is None:
                ended[name] = step
            else:
                tokens[name].append(token)
        step += 1
    assert tokens["stops"] == free[:3] and ended["stops"] == 3  # the stop token is not returned
    assert len(tokens["limit"]) == 2 and "limit" not in ended  # left after its last token, no None needed
    assert len(tokens["cancelled"]) == 4


def test_the_cache_drops_positions_no_remaining_row_needs():
    model = random_model()
    batch = ContinuousBatch(model, stop_token_ids=[])
    batch.add(["long", "short"], [PROMPTS["long"], PROMPTS["short"]], [SamplingParams(1), SamplingParams(6)])
    assert batch.mask.shape[1] == len(PROMPTS["long"])
    batch.step()  # "long" had its one token: it leaves, and the padding left of "short" goes with it
    batch.step()
    assert len(batch) == 1 and bool(batch.mask.all())
    assert batch.cache.keys[0].shape[2] >= batch.cache.length == batch.mask.shape[1]
