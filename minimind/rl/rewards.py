"""Rewards for reinforcement learning, as plain functions of one completion, combined by weights.

    --rewards answer=1,format=0.5,length=0.1     ->  reward = 1 * answer + 0.5 * format + 0.1 * length

- answer: 1 when the reply is well formed and its <answer> equals the reference reply's <answer> (the
  demo's addition problems, two-hop questions: anything with one right answer), else 0.
- format: 1 when the whole reply is <think>…</think><answer>…</answer>, each tag exactly once, else 0.
- length: 0 up to `length_limit` tokens, then falling linearly to -1 at twice the limit; a reply cut off
  at the token budget (no end of turn) gets -1.
- model: a registered model's score of the reply (mean log-probability of its tokens given the prompt),
  computed by the training loop (minimind.rl.grpo), which holds that model.
- call (tool use, `--tools`): 1 when the first turn makes exactly the reference's calls (the same tools, the
  same arguments, parsed), or, where the reference makes none, no call; else 0.
- reply (tool use): 1 when the completion has as many turns as the reference and its last states every tool
  result (or, with no call, is the reference's answer); else 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from minimind.data.tools import CallNotParsed, parse_calls
from minimind.model.tokenizer import Markers

MODEL_REWARD = "model"


@dataclass(frozen=True)
class Completion:
    text: str  # the decoded reply, stop token excluded
    tokens: int  # its length in tokens
    finished: bool  # ended with a stop token (not cut off at the token budget)
    reference: str | None = None  # the record's reference reply, if it has one
    turns: tuple[str, ...] = ()  # a multi-turn completion's turns (tool use): each the policy's, results left out
    reference_turns: tuple[str, ...] = ()  # the reference's turns: the call, then the answer from its result
    tool_results: tuple[str, ...] = ()  # what the tools answered the completion's calls


def reasoning_parts(text: str, markers: Markers = Markers()) -> tuple[str, str] | None:
    """(think, answer) of a reply that is exactly <think>\\n…\\n</think>\\n<answer>\\n…\\n</answer> with each
    tag once (minimind-3's style: <think>\\n…\\n</think>\\n\\n… with a non-empty answer); None for anything
    else (a missing, doubled or misplaced tag)."""
    tags = [tag for tag in (markers.think_start, markers.think_end, markers.answer_start, markers.answer_end) if tag]
    if any(text.count(tag) != 1 for tag in tags):
        return None
    think = rf"{re.escape(markers.think_start)}\n(.*?)\n{re.escape(markers.think_end)}\n"
    answer = rf"{re.escape(markers.answer_start)}\n(.*?)\n{re.escape(markers.answer_end)}"
    if not markers.has_answer_tags:  # minimind-3: a blank line, then a non-empty answer
        answer = r"\n(.*\S.*)"
    match = re.compile(think + answer, re.DOTALL).fullmatch(text.strip())
    return (match.group(1), match.group(2).strip()) if match else None


def reference_answer(message: dict, markers: Markers) -> str:
    """The answer of a reference reply in either style (its `reasoning_content`, if any, set apart)."""
    if message.get("reasoning_content"):
        return message["content"].strip()
    return markers.split_reply(message["content"])[1].strip()


def format_reward(completion: Completion, markers: Markers, length_limit: int) -> float:
    return 1.0 if reasoning_parts(completion.text, markers) else 0.0


def answer_reward(completion: Completion, markers: Markers, length_limit: int) -> float:
    if completion.reference is None:
        return 0.0
    got, want = reasoning_parts(completion.text, markers), reasoning_parts(completion.reference, markers)
    expected = want[1] if want else completion.reference.strip()  # a plain reference reply is the answer itself
    return 1.0 if got and got[1] == expected else 0.0


def length_reward(completion: Completion, markers: Markers, length_limit: int) -> float:
    if not completion.finished:
        return -1.0
    return -min(1.0, max(0, completion.tokens - length_limit) / max(length_limit, 1))


def _calls(turn: str) -> list[dict] | None:
    """A turn's calls ([] for none); None when they do not parse."""
    try:
        return parse_calls(turn)[1]
    except CallNotParsed:
        return None


def call_reward(completion: Completion, markers: Markers, length_limit: int) -> float:
    if not completion.turns or not completion.reference_turns:
        return 0.0
    wanted = _calls(completion.reference_turns[0]) or []
    return 1.0 if _calls(completion.turns[0]) == wanted else 0.0


def reply_reward(completion: Completion, markers: Markers, length_limit: int) -> float:
    if not completion.finished or len(completion.turns) != len(completion.reference_turns) or not completion.turns:
        return 0.0  # a right answer without the call the reference makes is a guess
    if completion.tool_results:  # the answer states what the tools said (a forecast is today's, not the record's)
        return 1.0 if all(result.strip() in completion.turns[-1] for result in completion.tool_results) else 0.0
    return 1.0 if completion.turns[-1].strip() == completion.reference_turns[-1].strip() else 0.0


REWARDS = {"answer": answer_reward, "format": format_reward, "length": length_reward, "call": call_reward,
           "reply": reply_reward}


def parse_weights(text: str) -> dict[str, float]:
    """"answer=1,format=0.5" -> {"answer": 1.0, "format": 0.5}; `model` is the model reward."""
    weights = {}
    for part in (part.strip() for part in text.split(",") if part.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in REWARDS and name != MODEL_REWARD:
            raise ValueError(f"unknown reward {name!r}: the rewards are {', '.join([*REWARDS, MODEL_REWARD])}")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"reward weight of {name!r} is not a number: {value!r}") from None
    if not weights:
        raise ValueError("no rewards given")
    return weights


def score(completions: list[Completion], weights: dict[str, float], markers: Markers, length_limit: int,
          model_scores: list[float] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Each completion's weighted reward, and every reward function's own values (for the logs)."""
    values = {name: [REWARDS[name](c, markers, length_limit) for c in completions] for name in weights if name != MODEL_REWARD}
    if MODEL_REWARD in weights:
        if model_scores is None:
            raise ValueError("the model reward needs a reward model's scores")
        values[MODEL_REWARD] = list(model_scores)
    totals = [sum(weights[name] * values[name][i] for name in weights) for i in range(len(completions))]
    return totals, values
