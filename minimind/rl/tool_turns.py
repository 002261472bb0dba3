"""Multi-turn rollouts with tools: when a completion ends with tool calls, the tools run and their results go
in as the chat template writes them (the end of the assistant's turn, a turn of `<tool_response>` blocks, the
assistant's next opening), and the policy writes its next turn after them.

The rollout actor (minimind.rl.rollout) asks `ToolTurns.results_turn` after each finished turn. The tokens it
inserts are the environment's: the trainer never trains on them (their labels are -100), only on the turns the
policy sampled, the call and the answer from its result alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from minimind.data.tools import CallNotParsed, parse_calls
from minimind.inference.chat import chat_prompt_ids

_RESULT = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)


def tool_results(results_turn: str) -> list[str]:
    """The results a rendered results turn holds, in order (both templates wrap each in <tool_response>)."""
    return _RESULT.findall(results_turn)


class ToolTurns:
    """Runs a turn's calls with `run(name, arguments) -> result text` and renders the results turn with
    `tokenizer`'s chat template, `tools` listed (they change nothing after the system turn, but a template may
    check them)."""

    def __init__(self, tokenizer, tools: list[dict], run: Callable[[str, dict], str], max_calls: int = 4):
        self.tokenizer, self.tools, self.run, self.max_calls = tokenizer, tools, run, max_calls

    def calls(self, turn_ids: list[int]) -> list[dict]:
        """The calls a turn makes, [] for a turn that makes none or whose calls do not parse (a malformed call
        gets no result: the reward decides what it is worth)."""
        try:
            return parse_calls(self.tokenizer.decode(turn_ids, skip_special_tokens=False))[1]
        except CallNotParsed:
            return []

    def results_turn(self, turn_ids: list[int]) -> list[int] | None:
        """What follows a finished turn that makes calls, up to the policy's next turn: the end-of-turn token
        it sampled, then the tools' results and the assistant's opening. None when the turn makes no call."""
        calls = self.calls(turn_ids)[: self.max_calls]
        if not calls:
            return None
        called = [{"id": f"call_{i}", "type": "function",
                   "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                  for i, c in enumerate(calls)]
        results = [{"role": "tool", "tool_call_id": f"call_{i}", "content": self.run(c["name"], c["arguments"])}
                   for i, c in enumerate(calls)]
        # rendered twice, without and with the results: what the template writes after the turn's end is the glue
        asked = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": called}]
        before = list(self.tokenizer.apply_chat_template(asked, tools=self.tools, tokenize=True, return_dict=False))
        after = chat_prompt_ids(self.tokenizer, asked + results, self.tools)
        end = len(before) - 1 - before[::-1].index(self.tokenizer.eos_token_id)  # the turn's end-of-turn token
        if after[:end] != before[:end]:
            raise ValueError("the chat template renders a conversation differently once tool results follow it")
        return after[end:]
