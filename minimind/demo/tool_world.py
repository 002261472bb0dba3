"""The demo world's tool use, written as SFT JSONL in OpenAI's message shape, with a held-out eval.

Two tools (tools.json) answer what the demo model cannot know: the sum of two four-digit numbers (it learns
three-digit column addition in the reasoning stage, and nothing longer), and a city's weather, which changes
by the day. Every chat lists both tools, as a client would whatever the question, and asks one question:
- a question that needs a tool: the call (name and arguments), the tool's result, and the answer that states it;
- a question that needs none (a fact of the world, the persona): the answer, no call.
Some fact and persona questions come without tools, as SFT asks them.

Held out, in tools_eval (each row's family in "task"):
- call: number pairs no training row uses, and the world's cities on days no training row uses, half of each
  in a phrasing training never uses;
- no_call: the held-out phrasings of the world's facts (sft_eval's), and the held-out persona questions.
"""

from __future__ import annotations

import datetime
import json
import random

from minimind.demo.tools import EPOCH, demo_tools, run_tool
from minimind.demo.world import (
    ATTRIBUTES,
    CITIES,
    HELD_OUT_PERSONA_QUESTIONS,
    HELD_OUT_QUESTIONS,
    PERSONA_QUESTIONS,
    PERSONA_REPLY,
    QUESTIONS,
    World,
    chat,
)

# tool -> (training phrasings, the held-out phrasing, phrasings only reinforcement learning's prompts use)
PHRASINGS = {
    "add": (("{a}加{b}等于几？", "请帮我算一下{a}加{b}。", "{a}和{b}相加是多少？"), "{a}加{b}的结果是多少？",
            ("{a}加上{b}是多少？", "计算{a}加{b}。", "{a}加{b}等于多少？", "请问{a}加{b}的和是多少？")),
    "weather": (("{city}今天天气怎么样？", "请帮我查一下{city}的天气。", "{city}今天是什么天气？"), "{city}今天的天气如何？",
                ("{city}的天气怎么样？", "查一下{city}今天的天气。")),
}
OPERANDS = range(1000, 10000)


def call_turns(tool: str, arguments: dict, question: str, day: datetime.date) -> list[dict]:
    """The question, the assistant's call (OpenAI's shape: arguments as JSON text), the tool's result on `day`, and
    the answer that states it."""
    result = run_tool(tool, arguments, day)
    call = {"id": "call_0", "type": "function",
            "function": {"name": tool, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    answer = f"{arguments['a']}加{arguments['b']}等于{result}。" if tool == "add" else f"{arguments['city']}今天{result}。"
    return [
        {"role": "user", "content": question.format(**arguments)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
        {"role": "assistant", "content": answer},
    ]


def tool_rows(world: World, calls: int = 1200, held_out_calls: int = 200, plain: int = 300,
              without_tools: int = 200) -> tuple[list[dict], list[dict]]:
    """`calls` questions that need a tool (half each) and `plain` fact and persona questions that need none, each
    a chat that lists the tools; and `without_tools` fact questions and the persona ones with no tools listed, as
    SFT asks them. Eval: `held_out_calls` unseen number pairs and city-days, and 200 no-call questions."""
    rng = random.Random(f"{world.seed}/tools")
    tools = demo_tools()
    pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set: training pairs, then held-out ones
    while len(pairs) < calls + held_out_calls:
        pairs.setdefault((rng.choice(OPERANDS), rng.choice(OPERANDS)))
    days = [EPOCH + datetime.timedelta(days=n) for n in rng.sample(range(19_000, 22_000), calls + held_out_calls)]
    facts = [(e, a) for e in world.asked() for a in ATTRIBUTES]

    def question(index: int, pair: tuple[int, int], day: datetime.date, held_out: bool) -> list[dict]:
        tool = "add" if index % 2 == 0 else "weather"
        arguments = {"a": pair[0], "b": pair[1]} if tool == "add" else {"city": CITIES[index // 2 % len(CITIES)]}
        phrasings, held_out_phrasing, _ = PHRASINGS[tool]
        phrasing = held_out_phrasing if held_out and index % 4 >= 2 else rng.choice(phrasings)
        return call_turns(tool, arguments, phrasing, day)

    def plain_question() -> list[dict]:
        if rng.random() < 0.1:
            return chat(rng.choice(PERSONA_QUESTIONS), PERSONA_REPLY)
        entity, attribute = rng.choice(facts)
        return chat(rng.choice(QUESTIONS[attribute]).format(n=entity.name), entity.state(attribute))

    ordered = list(zip(pairs, days))
    chats = [question(i, pair, day, False) for i, (pair, day) in enumerate(ordered[:calls])]
    chats += [plain_question() for _ in range(plain)]
    rows = [{"conversations": conversation, "tools": tools} for conversation in chats]
    for entity, attribute in rng.sample(facts, without_tools):
        rows.append({"conversations": chat(rng.choice(QUESTIONS[attribute]).format(n=entity.name), entity.state(attribute))})
    rows += [{"conversations": chat(question, PERSONA_REPLY)} for question in PERSONA_QUESTIONS]
    rng.shuffle(rows)

    held_out = [("call", question(i, pair, day, True)) for i, (pair, day) in enumerate(ordered[calls:])]
    for entity, attribute in rng.sample(facts, 200 - len(HELD_OUT_PERSONA_QUESTIONS)):
        asked = rng.choice(HELD_OUT_QUESTIONS[attribute]).format(n=entity.name)
        held_out.append(("no_call", chat(asked, entity.state(attribute))))
    held_out += [("no_call", chat(asked, PERSONA_REPLY)) for asked in HELD_OUT_PERSONA_QUESTIONS]
    rng.shuffle(held_out)  # any first N rows (--eval-limit) hold both families
    return rows, [{"conversations": c, "tools": tools, "task": task} for task, c in held_out]


def rl_rows(world: World, taken: set[tuple[int, int]], calls: int = 800, plain: int = 200) -> list[dict]:
    """Prompts for reinforcement learning (`jobs/grpo.py --tools demo`), records as tools.jsonl's: `calls` questions
    that need a tool (half sums of number pairs not in `taken`, the pairs of tools.jsonl and its held-out file;
    half forecasts) and `plain` fact and persona questions that need none, all listing the tools. A policy rewarded
    on its SFT rows would only repeat what it memorised: these numbers are new, and the calls are asked in phrasings
    neither SFT nor the held-out file uses."""
    rng = random.Random(f"{world.seed}/tools-rl")
    tools = demo_tools()
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < calls // 2:
        pair = (rng.choice(OPERANDS), rng.choice(OPERANDS))
        if pair not in taken:
            pairs.setdefault(pair)
    days = [EPOCH + datetime.timedelta(days=n) for n in rng.sample(range(19_000, 22_000), calls - calls // 2)]
    chats = [call_turns("add", {"a": a, "b": b}, rng.choice(PHRASINGS["add"][2]), days[0]) for a, b in pairs]
    chats += [call_turns("weather", {"city": rng.choice(CITIES)}, rng.choice(PHRASINGS["weather"][2]), day) for day in days]
    facts = [(e, a) for e in world.asked() for a in ATTRIBUTES]
    for _ in range(plain):
        if rng.random() < 0.1:
            chats.append(chat(rng.choice(PERSONA_QUESTIONS), PERSONA_REPLY))
        else:
            entity, attribute = rng.choice(facts)
            chats.append(chat(rng.choice(QUESTIONS[attribute]).format(n=entity.name), entity.state(attribute)))
    rng.shuffle(chats)
    return [{"conversations": conversation, "tools": tools} for conversation in chats]


def sum_pairs(records: list[dict]) -> set[tuple[int, int]]:
    """The number pairs of the records' `add` calls."""
    pairs = set()
    for record in records:
        for message in record["conversations"]:
            for call in message.get("tool_calls", ()):
                if call["function"]["name"] == "add":
                    arguments = json.loads(call["function"]["arguments"])
                    pairs.add((arguments["a"], arguments["b"]))
    return pairs
