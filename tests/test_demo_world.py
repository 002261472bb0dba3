import json
import re
from collections import Counter

import pytest

from minimind.demo.world import (
    ATTRIBUTES,
    HELD_OUT_PERSONA_QUESTIONS,
    HELD_OUT_QUESTIONS,
    PERSONA_QUESTIONS,
    PERSONA_REPLY,
    QUESTIONS,
    STATEMENTS,
    TWO_HOP,
    addition_trace,
    build_world,
    write_text_world,
)

NAMES = ["pretrain", "sft", "dpo", "reason"]
FILES = NAMES + [f"{name}_eval" for name in NAMES]
PLACE = re.compile(r"([个十百])位：(\d)\+(\d)\+([01])=(\d+)，写(\d)，进([01])。")
REASONED = re.compile(r"<think>\n(.+)\n</think>\n<answer>\n(.+)\n</answer>", re.DOTALL)
ADDITION = re.compile(r"(?:请计算)?(\d+)(?:\+|加上|加)(\d+)(?:等于多少？|是多少？|。)")  # the teacher's question templates


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_text_world(tmp_path_factory.mktemp("world"), seed=0)


@pytest.fixture(scope="module")
def data(written):
    return {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] for name, path in written.items()}


def sentences(text: str) -> list[str]:
    return re.findall(r"[^。]+。", text)


def pretrain_sentences(data) -> set[str]:
    return {s for row in data["pretrain"] for s in sentences(row["text"])}


def user_texts(rows: list[dict], key: str = "conversations") -> set[str]:
    return {m["content"] for row in rows for m in row[key] if m["role"] == "user"}


def final_replies(data, name: str) -> list[str]:
    key = "chosen" if name.startswith("dpo") else "conversations"
    return [row[key][-1]["content"] for row in data[name]]


def check_conversation(messages: list[dict]) -> None:
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"] for m in messages)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0 and turns


def test_same_seed_same_bytes_other_seed_differs(written, tmp_path):
    again = write_text_world(tmp_path / "again", seed=0)
    other = write_text_world(tmp_path / "other", seed=1)
    assert sorted(written) == sorted(again) == sorted(FILES)
    for name in FILES:
        assert written[name].read_bytes() == again[name].read_bytes(), name
        assert written[name].read_bytes() != other[name].read_bytes(), name


def test_world_is_well_formed():
    world = build_world(seed=0)
    names = [e.name for e in world.entities]
    assert len(names) == len(set(names)) == 120
    assert all(world[e.friend].friend == e.name != e.friend for e in world.entities)  # mutual, never oneself
    for group in (world.never_asked, world.two_hop_held_out):  # whole friend pairs are held out
        assert group and all(world[name].friend in group for name in group)
    assert not set(world.never_asked) & set(world.two_hop_held_out)
    with pytest.raises(ValueError):
        build_world(num_entities=301)


def test_every_file_matches_its_format(data):
    for name in ("pretrain", "pretrain_eval"):
        assert data[name] and all(set(row) == {"text"} and row["text"] for row in data[name])
    for name in ("sft", "reason"):
        assert data[name] and all(set(row) == {"conversations"} for row in data[name])
    tasks = {"sft_eval": {"held_out_phrasing", "never_asked", "two_hop", "persona"}, "reason_eval": {"addition", "two_hop"}}
    for name, families in tasks.items():  # each held-out row names its family, and the families are mixed
        assert data[name] and all(set(row) == {"conversations", "task"} for row in data[name])
        assert {row["task"] for row in data[name]} == families
        assert {"two_hop"} < {row["task"] for row in data[name][:20]}  # shuffled: --eval-limit keeps every family
    for name in ("sft", "sft_eval", "reason", "reason_eval"):
        for row in data[name]:
            check_conversation(row["conversations"])
    for row in data["reason_eval"]:
        assert all(REASONED.fullmatch(m["content"]) for m in row["conversations"] if m["role"] == "assistant")
    plain = [row for row in data["reason"] if not REASONED.fullmatch(row["conversations"][-1]["content"])]
    assert 0 < len(plain) < len(data["reason"]) / 2  # ordinary chat mixed into the traces, so that facts are not forgotten
    world = build_world(seed=0)
    asked = {(t.format(n=e.name), e.state(a)) for e in world.asked() for a in ATTRIBUTES for t in QUESTIONS[a]}
    asked |= {(question, PERSONA_REPLY) for question in PERSONA_QUESTIONS}
    assert {
        (row["conversations"][0]["content"], row["conversations"][-1]["content"]) for row in plain
    } <= asked  # training questions only
    for name in ("dpo", "dpo_eval"):
        assert data[name]
        for row in data[name]:
            assert set(row) == {"chosen", "rejected"}
            check_conversation(row["chosen"])
            check_conversation(row["rejected"])
            assert row["chosen"][:-1] == row["rejected"][:-1]
            assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
            assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
    assert any(len(row["conversations"]) > 2 for row in data["sft"])  # multi-turn chats exist
    for name in ("pretrain_eval", "dpo_eval"):
        assert 100 <= len(data[name]) <= 300, name
    for name in ("sft_eval", "reason_eval"):  # 200 records a family, so one record is 0.5 points (persona has 16 phrasings)
        counts = Counter(row["task"] for row in data[name])
        assert all(count == 200 for task, count in counts.items() if task != "persona"), (name, counts)
    assert Counter(row["task"] for row in data["sft_eval"])["persona"] == 2 * len(HELD_OUT_PERSONA_QUESTIONS) == 32


def check_column_addition(a: int, b: int, think: str) -> None:
    """Replay the teacher's trace: each place adds the right digits and the carry, and writes the right digit."""
    steps = PLACE.findall(think)
    assert [place for place, *_ in steps] == ["个", "十", "百"]
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, written = 0, ""
    for i, (_, x, y, carry_in, total, digit, carry_out) in enumerate(steps):
        assert (x, y, int(carry_in)) == (digits_a[i], digits_b[i], carry)
        assert int(total) == int(x) + int(y) + carry and int(digit) == int(total) % 10
        carry = int(total) // 10
        assert int(carry_out) == carry
        written = digit + written
    assert int(("1" if carry else "") + written) == a + b
    assert think.endswith(f"所以结果是{a + b}。")


def test_addition_teacher_is_right(data):
    checked = 0
    for row in data["reason"] + data["reason_eval"]:
        question, reply = row["conversations"][0]["content"], row["conversations"][-1]["content"]
        if match := ADDITION.fullmatch(question):
            a, b = map(int, match.groups())
            think, answer = REASONED.fullmatch(reply).groups()
            check_column_addition(a, b, think)
            assert answer == f"{a}+{b}={a + b}"
            checked += 1
    assert checked >= 1000
    assert addition_trace(999, 185).endswith("<answer>\n999+185=1184\n</answer>")
    with pytest.raises(ValueError, match="three-digit"):
        addition_trace(999, 85)


def test_held_out_prompts_never_appear_in_training(data):
    world = build_world(seed=0)
    sft_users, dpo_users = user_texts(data["sft"]), user_texts(data["dpo"], "chosen")
    assert not user_texts(data["sft_eval"]) & sft_users
    assert not user_texts(data["dpo_eval"], "chosen") & (dpo_users | sft_users)
    assert not user_texts(data["reason_eval"]) & (user_texts(data["reason"]) | sft_users)

    def pairs(rows):
        return {frozenset(map(int, m.groups())) for row in rows if (m := ADDITION.fullmatch(row["conversations"][0]["content"]))}

    assert not pairs(data["reason_eval"]) & pairs(data["reason"])  # not even in the other order

    # Never-asked people are never the subject of a training question; held-out two-hop pairs never asked two-hop.
    for name in world.never_asked:
        assert not any(name in text for text in sft_users | dpo_users), name
    two_hop_questions = {TWO_HOP[a].format(n=n) for n in world.two_hop_held_out for a in TWO_HOP}
    assert not two_hop_questions & (sft_users | user_texts(data["reason"]))
    assert two_hop_questions & user_texts(data["sft_eval"]) and two_hop_questions & user_texts(data["reason_eval"])

    # All three held-out kinds are in sft_eval.
    held_out_phrasings = {t.format(n=e.name) for e in world.asked() for a in ATTRIBUTES for t in HELD_OUT_QUESTIONS[a]}
    eval_users = user_texts(data["sft_eval"])
    assert eval_users & held_out_phrasings
    assert set("".join(held_out_phrasings)) <= set("".join(sft_users))  # new sentences, known words
    assert any(name in text for text in eval_users for name in world.never_asked)

    # Pretraining eval: no paragraph seen in training, each one a full profile of true facts stated in
    # training's own sentence forms (so its loss measures facts, not unseen words).
    train_texts = {row["text"] for row in data["pretrain"]}
    assert not {row["text"] for row in data["pretrain_eval"]} & train_texts
    true_statements = {e.state(a, t) for e in world.entities for a in ATTRIBUTES for t in STATEMENTS[a]}
    for row in data["pretrain_eval"]:
        assert len(sentences(row["text"])) == len(ATTRIBUTES) and set(sentences(row["text"])) <= true_statements
    train_characters = set("".join(train_texts))
    assert set("".join(row["text"] for row in data["pretrain_eval"])) <= train_characters


def test_every_fact_and_answer_is_stated_in_pretraining(data):
    world = build_world(seed=0)
    stated = pretrain_sentences(data)
    assert all(e.state(a) in stated for e in world.entities for a in ATTRIBUTES)
    replies = [
        m["content"]
        for name in ("sft", "sft_eval")
        for row in data[name]
        for m in row["conversations"]
        if m["role"] == "assistant"
    ]
    replies += final_replies(data, "dpo") + final_replies(data, "dpo_eval")
    replies += [
        m["content"]
        for name in ("reason", "reason_eval")
        for row in data[name]
        for m in row["conversations"]
        if m["role"] == "assistant" and "+" not in m["content"]
    ]
    checked = 0
    for reply in replies:
        if reply == PERSONA_REPLY:
            continue
        answer = match.group(2) if (match := REASONED.fullmatch(reply)) else reply
        assert sentences(answer) and "".join(sentences(answer)) == answer, reply
        assert all(s in stated for s in sentences(answer)), reply
        checked += 1
    assert checked > 3000


def test_persona_is_present_and_consistent(data):
    assert PERSONA_REPLY.startswith("我是 MiniMind，")
    for name in ("sft", "sft_eval"):
        for row in data[name]:
            turns = [m for m in row["conversations"] if m["role"] != "system"]
            for question, reply in zip(turns[::2], turns[1::2]):
                if question["content"] in PERSONA_QUESTIONS + HELD_OUT_PERSONA_QUESTIONS:
                    assert reply["content"] == PERSONA_REPLY
                if "MiniMind" in reply["content"] or reply["content"].startswith("我是"):
                    assert reply["content"] == PERSONA_REPLY
    assert set(PERSONA_QUESTIONS) <= user_texts(data["sft"])
    assert set(HELD_OUT_PERSONA_QUESTIONS) <= user_texts(data["sft_eval"])
    assert {row["chosen"][-1]["content"] for row in data["dpo"] if row["chosen"][0]["content"] in PERSONA_QUESTIONS} == {
        PERSONA_REPLY
    }


def test_showcase_prompts_are_held_out_and_continuations_start_their_references(data):
    from minimind.demo.world import showcase

    prompts = showcase(build_world(seed=0))
    assert [p["task"] for p in prompts] == ["held_out_phrasing", "never_asked", "two_hop", "addition", "persona"]
    trained = user_texts(data["sft"]) | user_texts(data["reason"]) | user_texts(data["dpo"], "chosen")
    assert not {p["question"] for p in prompts} & trained
    assert all(p["reference"].startswith(p["continuation"]) or p["task"] == "addition" for p in prompts)
    assert prompts[3]["question"] in user_texts(data["reason_eval"])
