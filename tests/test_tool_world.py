"""The demo world's tool use: its rows load as SFT data with their tools, every call is right and its result
the tool's, the held-out numbers and days are unseen, and the scorer of the held-out file counts what it says."""

import datetime
import json
import re
from collections import Counter

import pytest

from minimind.data.rows import iter_jsonl
from minimind.demo.tool_world import PHRASINGS, tool_rows
from minimind.demo.tools import demo_tools, run_tool, weather
from minimind.demo.world import CITIES, PERSONA_REPLY, build_world


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    paths = {}
    for name, rows in zip(("tools", "tools_eval"), tool_rows(build_world(0))):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def calls_of(record: dict) -> list[dict]:
    return [c["function"] for m in record["conversations"] for c in m.get("tool_calls", ())]


def numbers(records: list[dict]) -> set[str]:
    """The arguments of every call the records make."""
    return {json.dumps(json.loads(call["arguments"]), sort_keys=True) for record in records for call in calls_of(record)}


def test_tool_rows_load_as_sft_data_and_every_call_is_right(written):
    train = [record for _, record in iter_jsonl(written["tools"], "sft")]
    held_out = [record for _, record in iter_jsonl(written["tools_eval"], "sft")]
    assert all(record["tools"] == demo_tools() for record in held_out)  # every held-out prompt lists both tools
    assert sum(not r.get("tools") for r in train) == 224  # fact and persona questions asked as SFT asks, no tools
    called = Counter()
    for index, record in enumerate(train + held_out):
        conversation = record["conversations"]
        if len(conversation) == 2:  # a question that needs no tool: answered directly
            assert [m["role"] for m in conversation] == ["user", "assistant"] and "tool_calls" not in conversation[1]
            continue
        user, call_message, result, answer = conversation
        (call,) = call_message["tool_calls"]
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        assert record["tools"] == demo_tools() and result["role"] == "tool"
        if name == "add":
            a, b = arguments["a"], arguments["b"]
            assert 1000 <= a <= 9999 and 1000 <= b <= 9999 and str(a) in user["content"] and str(b) in user["content"]
            assert result["content"] == str(a + b) and answer["content"] == f"{a}加{b}等于{a + b}。"
        else:
            city = arguments["city"]
            assert name == "weather" and city in CITIES and city in user["content"] and "天气" in user["content"]
            assert answer["content"] == f"{city}今天{result['content']}。"
        called[name] += index < len(train)
    assert called == {"add": 600, "weather": 600}


def test_a_citys_weather_is_the_tools_on_the_rows_day_and_changes_by_the_day(written):
    forecasts = set()
    for line in written["tools"].read_text(encoding="utf-8").splitlines():
        conversation = json.loads(line)["conversations"]
        if len(conversation) == 4 and conversation[1]["tool_calls"][0]["function"]["name"] == "weather":
            forecasts.add(conversation[2]["content"])
    assert len(forecasts) > 40  # not one answer per city: the answer must be read from the result
    day = datetime.date(2026, 12, 7)
    assert run_tool("weather", {"city": "北京"}, day) == weather("北京", day)
    assert len({weather("北京", day + datetime.timedelta(days=n)) for n in range(30)}) > 5
    assert run_tool("weather", {"city": 3}).startswith("error") and run_tool("add", {"a": "1", "b": 2}).startswith("error")


def test_held_out_calls_use_unseen_numbers_days_and_phrasings_and_no_call_rows_need_none(written):
    train = [json.loads(line) for line in written["tools"].read_text(encoding="utf-8").splitlines()]
    held_out = [json.loads(line) for line in written["tools_eval"].read_text(encoding="utf-8").splitlines()]
    assert Counter(r["task"] for r in held_out) == {"call": 200, "no_call": 200}
    sums = [r for r in held_out if r["task"] == "call" and calls_of(r)[0]["name"] == "add"]
    train_sums = [r for r in train if r.get("tools") and len(r["conversations"]) == 4 and calls_of(r)[0]["name"] == "add"]
    assert len(numbers(sums)) == 100 and len(numbers(train_sums)) == 600 and not numbers(sums) & numbers(train_sums)
    forecasts = {(r["conversations"][0]["content"], r["conversations"][2]["content"])
                 for r in train if len(r["conversations"]) == 4}
    held_forecasts = [r for r in held_out if r["task"] == "call" and calls_of(r)[0]["name"] == "weather"]
    assert len(held_forecasts) == 100 and len({json.loads(calls_of(r)[0]["arguments"])["city"] for r in held_forecasts}) == 16
    assert sum((r["conversations"][0]["content"], r["conversations"][2]["content"]) in forecasts
               for r in held_forecasts) < 10  # unseen days: what training said of a city is mostly not today's weather
    unseen = [p[1] for p in PHRASINGS.values()]
    questions = [r["conversations"][0]["content"] for r in held_out if r["task"] == "call"]
    assert sum(any(q.endswith(p.split("}")[-1]) for p in unseen) for q in questions) == 100  # half in unseen phrasings
    no_call = [r for r in held_out if r["task"] == "no_call"]
    assert all("tool_calls" not in m for r in no_call for m in r["conversations"])
    assert any(r["conversations"][-1]["content"] == PERSONA_REPLY for r in no_call)
    train_questions = {r["conversations"][0]["content"] for r in train}
    assert not {r["conversations"][0]["content"] for r in no_call} & train_questions  # held-out phrasings


def test_tool_use_scores_count_calls_answers_and_restraint(tmp_path):
    from conftest import memorized_model

    from minimind.driver.evaluate import tool_use_scores
    from minimind.model.tokenizer import TOOLS_CALL_FORM, TOOLS_PREAMBLE, train_tokenizer

    tools = [{"type": "function", "function": {"name": "add"}}]  # short prompts: a tiny model memorises them in seconds
    texts = [TOOLS_PREAMBLE, TOOLS_CALL_FORM, json.dumps(tools[0]), '{"name": "add", "arguments": {"a": 1234, "b": 4321}}',
             "1234加4321等于几？5555", PERSONA_REPLY, "<tool_response></tool_response>"]
    byte_tokenizer = train_tokenizer(texts * 20, vocab_size=600)
    call = {"role": "user", "content": "1234加4321等于几？"}
    after_call = [call, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1234, "b": 4321}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "5555"}]
    plain = [{"role": "user", "content": "你是谁？"}]
    model = memorized_model(
        byte_tokenizer, [call], '<tool_call>\n{"name": "add", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>',
        tools=tools, also=((after_call, "1234加4321等于5555。", tools), (plain, PERSONA_REPLY, tools)))

    def record(conversation, answer, task):
        return {"conversations": [*conversation, {"role": "assistant", "content": answer}], "tools": tools, "task": task}

    right = [record(after_call, "1234加4321等于5555。", "call"), record(plain, PERSONA_REPLY, "no_call")]
    path = tmp_path / "right.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in right), encoding="utf-8")
    scores = tool_use_scores(model, byte_tokenizer, path)
    assert (scores["call"], scores["answer"], scores["no_call"]) == (1.0, 1.0, 1.0), scores["samples"]

    wrong_call = json.loads(json.dumps(right[0]))  # the same question, but the record's call has other arguments
    wrong_call["conversations"][1]["tool_calls"][0]["function"]["arguments"] = '{"a": 4321, "b": 1234}'
    wrong_call["conversations"][-1]["content"] = "等于 5555。"
    needs_a_call = record(after_call, "1234加4321等于5555。", "no_call")  # calls, where the record says it needs none
    needs_a_call["conversations"] = [call, needs_a_call["conversations"][-1]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (wrong_call, needs_a_call)), encoding="utf-8")
    scores = tool_use_scores(model, byte_tokenizer, path)
    assert (scores["call"], scores["answer"], scores["no_call"]) == (0.0, 0.0, 0.0)


def test_grpo_prompts_ask_new_numbers_in_phrasings_no_other_file_uses(written):
    from minimind.demo.tool_world import rl_rows, sum_pairs

    train = [json.loads(line) for line in written["tools"].read_text(encoding="utf-8").splitlines()]
    held_out = [json.loads(line) for line in written["tools_eval"].read_text(encoding="utf-8").splitlines()]
    taken = sum_pairs(train + held_out)
    assert len(taken) == 700
    prompts = rl_rows(build_world(0), taken)
    assert len(prompts) == 1000 and all(record["tools"] == demo_tools() for record in prompts)
    assert len(sum_pairs(prompts)) == 400 and not sum_pairs(prompts) & taken
    names = Counter(calls_of(record)[0]["name"] if calls_of(record) else None for record in prompts)
    assert names == {"add": 400, "weather": 400, None: 200}

    def phrasings(records):  # each question that needs a call, its numbers and city put back as placeholders
        asked = {r["conversations"][0]["content"] for r in records if calls_of(r)}
        return {re.sub("|".join(CITIES), "{city}", re.sub(r"\d+", "{n}", question)) for question in asked}

    rl_phrasings = {re.sub(r"\{[ab]\}", "{n}", p) for tool in PHRASINGS.values() for p in tool[2]}
    assert phrasings(prompts) == rl_phrasings and not phrasings(train + held_out) & rl_phrasings
