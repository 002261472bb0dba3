"""The rewards of GRPO on the edge cases a sampled reply produces."""

import pytest

from minimind.model.tokenizer import Markers
from minimind.rl.rewards import Completion, answer_reward, format_reward, length_reward, parse_weights, reasoning_parts, score

M = Markers()
GOOD = "<think>\n个位：9+7+0=16，写6，进1。\n</think>\n<answer>\n669+827=1496\n</answer>"


def reply(text, reference=GOOD, tokens=10, finished=True):
    return Completion(text, tokens, finished, reference)


@pytest.mark.parametrize("text", [
    GOOD.replace("</think>", "</think></think>"),  # a doubled tag
    GOOD.replace("<answer>\n669+827=1496\n</answer>", ""),  # no answer
    GOOD.replace("<think>\n", ""),  # no opening tag
    GOOD + "\n还有别的。",  # text after the answer
    "669+827=1496",  # no tags at all
    "<answer>\n669+827=1496\n</answer>\n<think>\n想\n</think>",  # the blocks swapped
])
def test_malformed_replies_get_neither_format_nor_answer_reward(text):
    assert reasoning_parts(text, M) is None
    assert format_reward(reply(text), M, 100) == 0.0
    assert answer_reward(reply(text), M, 100) == 0.0


def test_the_answer_reward_compares_answers_not_thoughts():
    assert reasoning_parts("  " + GOOD + "\n", M) == ("个位：9+7+0=16，写6，进1。", "669+827=1496")
    other_thoughts = GOOD.replace("写6", "写了6")
    assert format_reward(reply(other_thoughts), M, 100) == answer_reward(reply(other_thoughts), M, 100) == 1.0
    wrong = GOOD.replace("=1496", "=1486")
    assert format_reward(reply(wrong), M, 100) == 1.0 and answer_reward(reply(wrong), M, 100) == 0.0
    assert answer_reward(reply(GOOD, reference=None), M, 100) == 0.0  # nothing to check against
    plain = "<think>\n想\n</think>\n<answer>\n蓝色。\n</answer>"
    assert answer_reward(reply(plain, reference="蓝色。"), M, 100) == 1.0  # a plain reference is the answer itself


def test_the_length_reward_falls_past_the_limit_and_a_cut_off_reply_gets_the_worst():
    assert length_reward(reply(GOOD, tokens=100), M, 100) == 0.0
    assert length_reward(reply(GOOD, tokens=150), M, 100) == -0.5
    assert length_reward(reply(GOOD, tokens=400), M, 100) == -1.0
    assert length_reward(reply(GOOD, tokens=20, finished=False), M, 100) == -1.0


def test_weights_combine_the_rewards_and_bad_specs_are_named():
    assert parse_weights("answer=1, format=0.5,length") == {"answer": 1.0, "format": 0.5, "length": 1.0}
    totals, values = score([reply(GOOD), reply(GOOD.replace("=1496", "=1"))], {"answer": 1.0, "format": 0.5}, M, 100)
    assert totals == [1.5, 0.5] and values == {"answer": [1.0, 0.0], "format": [1.0, 1.0]}
    totals, values = score([reply(GOOD)], {"format": 1.0, "model": 2.0}, M, 100, model_scores=[-0.25])
    assert totals == [0.5] and values["model"] == [-0.25]
    with pytest.raises(ValueError, match="unknown reward 'corect'"):
        parse_weights("corect=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("answer=high")
    with pytest.raises(ValueError, match="needs a reward model's scores"):
        score([reply(GOOD)], {"model": 1.0}, M, 100)
