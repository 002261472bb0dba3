"""GRPO with tools: a rollout that calls a tool gets the tool's result, as the chat template writes it, and writes
its next turn after it; the result's tokens are never trained on; the call and the reply are rewarded."""

import pytest
import torch

from minimind.demo.tools import demo_tools, run_tool
from minimind.inference.chat import chat_prompt_ids
from minimind.model.losses import IGNORE_INDEX
from minimind.model.tokenizer import Markers
from minimind.rl.grpo import Prompt, policy_turns, sequences, tool_prompts
from minimind.rl.rewards import Completion, score
from minimind.rl.rollout import RolloutWorker
from minimind.rl.tool_turns import ToolTurns, tool_results

TOOLS = demo_tools()
QUESTION = [{"role": "user", "content": "1234加4321等于几？"}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>'
CALLED = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1234, "b": 4321}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_0", "content": "5555"}
ANSWER = "1234加4321等于5555。"


@pytest.fixture(scope="module")
def tokenizer(ray_cluster):
    from minimind.demo import demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    return load_tokenizer(demo_tokenizer())


def test_the_results_turn_is_what_a_chat_client_sends_after_a_call(tokenizer):
    turns = ToolTurns(tokenizer, TOOLS, run_tool)
    call = tokenizer.encode(CALL, add_special_tokens=False)
    glue = turns.results_turn(call)
    assert glue[0] == tokenizer.eos_token_id  # the end of the policy's turn, then the environment's tokens
    after_the_call = chat_prompt_ids(tokenizer, [*QUESTION, CALLED, RESULT], TOOLS)
    assert chat_prompt_ids(tokenizer, QUESTION, TOOLS) + call + glue == after_the_call
    assert tool_results(tokenizer.decode(glue)) == ["5555"]
    assert turns.results_turn(tokenizer.encode("1234加4321等于5555。", add_special_tokens=False)) is None  # no call
    unparsed = '<tool_call>\n{"name": "add", arguments": {"a": 1234}}\n</tool_call>'  # the quote the demo model once dropped
    assert turns.results_turn(tokenizer.encode(unparsed, add_special_tokens=False)) is None


def test_tool_results_are_never_trained_on_and_turns_are_cut_at_them():
    prompts = [Prompt([1, 2], "x")]
    completion = [10, 11, 0, 20, 21, 22, 12]  # turn, its end (0), three tokens of the tools, the next turn
    inserted = [[(3, 6)]]
    ids, labels = sequences(prompts, [completion], [True], 1, eos_id=0, pad_id=0, inserted=inserted)
    assert ids.tolist() == [[1, 2, *completion, 0]]
    assert labels.tolist() == [[IGNORE_INDEX] * 2 + [10, 11, 0] + [IGNORE_INDEX] * 3 + [12, 0]]
    assert policy_turns(completion, inserted[0]) == [[10, 11], [12]]
    assert policy_turns([10, 11], []) == [[10, 11]]


def completion(turns, reference_turns, results=(), finished=True):
    return Completion("".join(turns), 10, finished, reference_turns[-1], tuple(turns), tuple(reference_turns), tuple(results))


def test_the_call_and_reply_rewards():
    reference = (CALL, ANSWER)
    other_call = CALL.replace("4321", "4320")
    cases = [  # (turns, tool results) -> (call, reply)
        ((CALL, "那就是5555。"), ["5555"], (1.0, 1.0)),  # the answer states the result, in its own words
        ((CALL, "等于5554。"), ["5555"], (1.0, 0.0)),
        ((other_call, "等于5554。"), ["5554"], (0.0, 1.0)),  # the reply reads the result it got, right or wrong
        ((CALL.replace('"b"', "b"),), [], (0.0, 0.0)),  # a call that does not parse: no result, one turn
        ((ANSWER,), [], (0.0, 0.0)),  # a right answer without the call is a guess
    ]
    markers = Markers()
    for turns, results, expected in cases:
        _, values = score([completion(turns, reference, results)], {"call": 1, "reply": 1}, markers, 100)
        assert (values["call"][0], values["reply"][0]) == expected, turns
    no_call = ("黎明最喜欢的颜色是红色。",)
    _, values = score([completion(no_call, no_call), completion((CALL, "等于5555。"), no_call, ["5555"]),
                       completion(no_call, no_call, finished=False)], {"call": 1, "reply": 1}, markers, 100)
    assert values == {"call": [1.0, 0.0, 1.0], "reply": [1.0, 0.0, 0.0]}


def test_a_rollout_calls_the_tool_reads_its_result_and_answers(tokenizer):
    from conftest import memorized_model

    from minimind.data.rows import StageData, stage_row, validate_record

    model = memorized_model(tokenizer, QUESTION, CALL, tools=TOOLS, also=(([*QUESTION, CALLED, RESULT], ANSWER, TOOLS),))
    record = {"conversations": [*QUESTION, CALLED, RESULT, {"role": "assistant", "content": ANSWER}], "tools": TOOLS}
    stage = StageData("sft", seq_len=512)
    row = stage_row(validate_record(record, "sft"), stage, tokenizer, stage.marker_ids(tokenizer))
    (prompt,) = tool_prompts([row], tokenizer)
    assert prompt.ids == chat_prompt_ids(tokenizer, QUESTION, TOOLS) and prompt.turns == (CALL, ANSWER)

    worker = RolloutWorker(model.config.to_dict(), bf16=False)
    worker.load_weights(model.state_dict(), 0)
    out = worker.generate([prompt.ids], 2, {"max_new_tokens": 40, "temperature": 0.0, "stop_token_ids": [tokenizer.eos_token_id]},
                          ToolTurns(tokenizer, TOOLS, run_tool))
    call = tokenizer.encode(CALL, add_special_tokens=False)
    glue = ToolTurns(tokenizer, TOOLS, run_tool).results_turn(call)
    assert out["completions"][0] == call + glue + tokenizer.encode(ANSWER, add_special_tokens=False)
    assert out["inserted"] == [[(len(call) + 1, len(call) + len(glue))]] * 2 and out["finished"] == [True, True]

    _, values = score([Completion("", 0, True, ANSWER, (CALL, ANSWER), prompt.turns, ("5555",))], {"call": 1, "reply": 1},
                      Markers.of(tokenizer), 100)
    assert values == {"call": [1.0], "reply": [1.0]}
    assert torch.equal(torch.tensor(out["completions"][0]), torch.tensor(out["completions"][1]))
