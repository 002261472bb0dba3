"""Tool calling in the chat templates and the data: tools in the system turn, calls written as minimind-3 writes
them (supervised), results in user turns (not supervised), malformed calls named by file and line."""

import json

import pytest

from minimind.data.rows import DataFormatError, StageData, encode_conversations, iter_jsonl, stage_rows, validate_record
from minimind.data.tools import CallNotParsed, parse_calls
from minimind.model.tokenizer import TOOLS_CALL_FORM, TOOLS_PREAMBLE, train_tokenizer

TOOLS = [{"type": "function", "function": {"name": "add", "description": "两个整数相加",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
QUESTION = {"role": "user", "content": "1234 加 4321 等于几？"}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "add", "arguments": '{"a": 1234, "b": 4321}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_7", "content": "5555"}
ANSWER = {"role": "assistant", "content": "等于 5555。"}
CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>'
# the tools' prompt among the texts the tokenizer learns from, so it takes few tokens (and the memorising, seconds)
TEXTS = ["1234 加 4321 等于几？等于 5555。", "两个整数相加", "hello tools", TOOLS_PREAMBLE + json.dumps(TOOLS) + TOOLS_CALL_FORM]


@pytest.fixture(scope="module", params=["minimind2", "minimind-3"])
def tokenizer(request):
    return train_tokenizer(TEXTS * 20, vocab_size=400, split_han=True, split_digits=True, style=request.param)


def test_the_template_lists_tools_writes_calls_and_groups_results_in_a_user_turn(tokenizer):
    record = validate_record({"tools": TOOLS, "conversations": [QUESTION, CALL, RESULT, ANSWER]}, "sft")
    text = tokenizer.apply_chat_template(record["conversations"], tools=record["tools"], tokenize=False)
    start, end = tokenizer.bos_token, tokenizer.eos_token
    assert text.startswith(f"{start}system\n") and json.dumps(TOOLS[0], ensure_ascii=False) in text.split(end)[0]
    assert f"{CALL_TEXT}{end}\n{start}user\n<tool_response>\n5555\n</tool_response>{end}\n{start}assistant\n" in text
    plain = [QUESTION, ANSWER]  # without tools, the template renders as before tools existed
    assert "<tools>" not in tokenizer.apply_chat_template(plain, tokenize=False)


def test_the_call_is_supervised_and_the_tool_result_is_not(tokenizer):
    record = validate_record({"tools": TOOLS, "conversations": [QUESTION, CALL, RESULT, ANSWER]}, "sft")
    ((ids, supervised),) = encode_conversations(tokenizer, [record["conversations"]], tools=[record["tools"]])
    learned = tokenizer.decode(ids[supervised])
    assert CALL_TEXT in learned and "等于 5555。" in learned
    assert "<tool_response>" not in learned and "5555\n" not in learned.replace("等于 5555。", "")
    stage = StageData("sft", seq_len=2048)  # the tools' JSON is long in a small vocabulary
    row = stage_rows([record], stage, tokenizer, stage.marker_ids(tokenizer))[0]
    assert row["input_ids"] == ids.tolist()


@pytest.mark.parametrize("line, error", [
    ({"tools": TOOLS, "conversations": [QUESTION, {**CALL, "tool_calls": [{"function": {"name": "add", "arguments": "{a: 1"}}]},
                                        ANSWER]}, r"the arguments of the call of 'add' is not JSON"),
    ({"tools": TOOLS, "conversations": [QUESTION, {**CALL, "tool_calls": [{"function": {"name": "sub", "arguments": {}}}]},
                                        ANSWER]}, r"calls the unknown tool 'sub' \(the tools given: add\)"),
    ({"conversations": [QUESTION, RESULT, ANSWER]}, r"\[1\] is a tool result with no tool call before it"),
    ({"tools": TOOLS, "conversations": [QUESTION, CALL, {**RESULT, "tool_call_id": "call_9"}, ANSWER]},
     r"answers the tool call 'call_9', which the call before it does not make"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}], "conversations": [QUESTION, ANSWER]},
     r'"tools"\[0\] needs a function with a "name"'),
], ids=["arguments-not-json", "unknown-tool", "result-without-call", "wrong-call-id", "tool-without-name"])
def test_a_malformed_tool_record_is_named_by_file_and_line(tmp_path, line, error):
    path = tmp_path / "sft_tools.jsonl"
    good = {"tools": TOOLS, "conversations": [QUESTION, CALL, RESULT, ANSWER]}
    path.write_text("\n".join(json.dumps(record, ensure_ascii=False) for record in (good, line)) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"sft_tools.jsonl:2: .*" + error):
        list(iter_jsonl(path, "sft"))
    assert len(list(iter_jsonl(path, "sft", skip_bad=True))) == 1


def test_tools_in_the_system_message_and_bare_calls_load_as_upstream_writes_them():
    system = {"role": "system", "content": "你是 MiniMind。", "tools": json.dumps(TOOLS, ensure_ascii=False)}
    bare = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1234, "b": 4321}}]}
    record = validate_record({"conversations": [system, QUESTION, bare, {"role": "tool", "content": "5555"}, ANSWER]}, "sft")
    assert record["tools"] == TOOLS
    assert record["conversations"][2]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": {"a": 1234, "b": 4321}}}]


def test_a_reply_is_read_back_into_its_calls_or_refused_as_a_call():
    assert parse_calls("好的。\n" + CALL_TEXT + "\n" + CALL_TEXT) == (
        "好的。", [{"name": "add", "arguments": {"a": 1234, "b": 4321}}] * 2)
    assert parse_calls("等于 5555。") == ("等于 5555。", [])
    for broken in ("<tool_call>\n{\"name\": \"add\", \"arguments\": {\n</tool_call>", "<tool_call>\n{\"name\": \"add\"}",
                   CALL_TEXT + " 然后", "<tool_call>\n[1, 2]\n</tool_call>"):
        with pytest.raises(CallNotParsed):
            parse_calls(broken)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A tiny model that calls `add` for QUESTION, and answers once the result is in."""
    from conftest import memorized_model

    from minimind.model.checkpoint import save_model

    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=400, split_han=True, split_digits=True)
    call = {**CALL, "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1234, "b": 4321}}}]}
    model = memorized_model(tokenizer, [QUESTION], CALL_TEXT, tools=TOOLS,
                            also=(([QUESTION, call, {"role": "tool", "content": "5555"}], ANSWER["content"], TOOLS),))
    return save_model(model, tmp_path_factory.mktemp("tools") / "model", tokenizer=tokenizer)


def test_the_pyfunc_model_takes_tools_and_their_results(tool_model):
    from mlflow.models.utils import _enforce_schema

    from minimind.tracking.pyfunc import ChatPredictor, chat_signature

    tools = json.dumps(TOOLS, ensure_ascii=False)
    signature = chat_signature(takes_images=False)
    assert _enforce_schema({"messages": [QUESTION], "tools": tools}, signature.inputs) is not None  # tools: optional
    assert _enforce_schema({"messages": [QUESTION]}, signature.inputs) is not None
    predictor = ChatPredictor(tool_model)
    (reply,) = predictor.predict({"messages": [QUESTION], "tools": tools}, {"max_tokens": 120})
    assert parse_calls(reply) == ("", [{"name": "add", "arguments": {"a": 1234, "b": 4321}}])
    followed = [QUESTION, {"role": "assistant", "content": reply}, {"role": "tool", "content": "5555"}]
    assert predictor.predict({"messages": followed, "tools": tools}, {"max_tokens": 120}) == [ANSWER["content"]]


def test_minimind_chat_shows_a_call_asks_for_its_result_and_answers_with_it(tool_model, monkeypatch, capsys):
    from minimind.cli import main

    (tool_model.parent / "tools.json").write_text(json.dumps(TOOLS, ensure_ascii=False), encoding="utf-8")
    typed, asked = [QUESTION["content"], "5555"], []

    def type_in(prompt=""):  # the question, the tool's result, then the end of input
        asked.append(prompt)
        if len(asked) > len(typed):
            raise EOFError
        return typed[len(asked) - 1]

    monkeypatch.setattr("builtins.input", type_in)
    main(["chat", "--model", str(tool_model), "--tools", str(tool_model.parent / "tools.json"), "--temperature", "0",
          "--max-new-tokens", "120", "--compile", "off"])  # the compiled default is test_cli's (CI time)
    printed = capsys.readouterr().out
    assert asked[1] == 'result of add({"a": 1234, "b": 4321})> '
    assert CALL_TEXT in printed and printed.rstrip().endswith(ANSWER["content"])


@pytest.mark.parametrize("messages, error", [
    ([QUESTION, RESULT], "is a tool result with no tool call before it"),
    ([QUESTION, CALL, {**RESULT, "tool_call_id": "call_9"}],
     "answers the tool call 'call_9', which the call before it does not make"),
], ids=["result-without-call", "wrong-call-id"])
def test_a_request_is_refused_the_stray_tool_results_a_record_is(messages, error):
    from minimind.serve.protocol import APIError, Limits, parse_chat_request

    with pytest.raises(APIError, match=error) as refused:
        parse_chat_request({"model": "m", "messages": messages, "tools": TOOLS}, {"m": False}, Limits())
    assert refused.value.status == 400
    with pytest.raises(ValueError, match=error):
        validate_record({"tools": TOOLS, "conversations": [*messages, ANSWER]}, "sft")
