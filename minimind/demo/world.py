"""A small invented world, written as MiniMind's pretrain / SFT / DPO / reasoning JSONL, with held-out evals.

A hundred and twenty invented people (two-character names) each have a favourite colour, fruit and animal, a home
city, an age and one best friend (friendship is mutual: people come in pairs). Pretraining states every fact
many times, in several paraphrases, in shuffled short paragraphs; the later stages only teach the model to
*use* what pretraining stored: SFT asks short questions with short, deterministic answers (the answer
sentence is the canonical pretraining sentence, so exact match is meaningful), DPO prefers the correct,
concise answer over a wrong value or a rambling one, and the reasoning data is written by a rule-based
teacher (column addition of three-digit numbers with carries, and two-hop lookups through the friend relation).

Held out, so the `_eval` files measure generalisation rather than recall of training rows:
- pretrain_eval: full profiles of known people in sentence combinations training never uses (same words);
- sft_eval: (a) question phrasings reserved for eval, (b) people whose facts are never asked in SFT or DPO
  (only pretraining states them), (c) two-hop questions "X的好朋友住在哪里？" for friend pairs never asked
  two-hop in training, (d) persona phrasings; every row ends with the reference answer and names its
  family in "task" (held_out_phrasing, never_asked, two_hop, persona), rows of all families shuffled;
- dpo_eval: the never-asked people, and persona phrasings reserved for eval;
- reason_eval: addition problems whose number pair training never uses ("task": "addition"), and the
  held-out two-hop pairs ("two_hop").

Why so few people: facts are learned late and suddenly. Measured with the demo preset and the demo
tokenizer, 130 s of pretraining on this project's 2-core CPU picks the right value of a fact out of all
its candidates for 97% of 120 people, but for about 25% of 300 people.

Everything comes from `random.Random` seeded from the seed and a label, so one seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

# --------------------------------------------------------------------------- vocabulary of the world

FAMILY = "安白陈丁方高韩江柯林陆马宁欧潘秦苏唐万夏叶赵周舒温"
GIVEN = "明华乐岚涛雪凯悦晨峰琪瑶霖哲萱轩然芸翔璐逸航婷博楠可诗煜晗珂"
COLORS = ("红色", "橙色", "黄色", "绿色", "蓝色", "紫色", "白色", "黑色", "粉色", "灰色")
CITIES = ("北京", "上海", "广州", "成都", "杭州", "西安", "南京", "武汉",
          "青石镇", "云溪城", "月湖城", "星河镇", "松风村", "雾山城", "白沙湾", "金穗城")
FRUITS = ("苹果", "香蕉", "橙子", "葡萄", "西瓜", "草莓", "桃子", "梨", "芒果", "樱桃")
ANIMALS = ("猫", "狗", "兔子", "熊猫", "老虎", "狐狸", "海豚", "马", "羊", "猴子")
AGES = range(6, 81)

ATTRIBUTES = ("color", "city", "age", "fruit", "animal", "friend")

# Pretraining sentences per attribute ({n} = name, {v} = value). The first is canonical: it is also the SFT
# answer, so every answer sentence appears verbatim in pretraining.
STATEMENTS = {
    "color": ("{n}最喜欢的颜色是{v}。", "{n}喜欢{v}。", "在所有颜色里，{n}最爱{v}。", "{n}的衣服大多是{v}的。",
              "要问{n}喜欢什么颜色，答案是{v}。"),
    "city": ("{n}住在{v}。", "{n}的家在{v}。", "{n}是{v}人。", "{n}一直生活在{v}。", "如果想拜访{n}，要去{v}。"),
    "age": ("{n}今年{v}岁。", "{n}已经{v}岁了。", "{n}的年龄是{v}岁。", "今年{n}刚好{v}岁。"),
    "fruit": ("{n}最喜欢的水果是{v}。", "{n}爱吃{v}。", "{n}每天都要吃{v}。", "说到水果，{n}最喜欢{v}。"),
    "animal": ("{n}最喜欢的动物是{v}。", "{n}从小就喜欢{v}。", "在所有动物里，{n}最爱{v}。", "{n}画画时总是画{v}。"),
    "friend": ("{n}的好朋友是{v}。", "{n}和{v}是好朋友。", "{n}经常和{v}一起玩。", "{v}是{n}最好的朋友。"),
}
QUESTIONS = {
    "color": ("{n}最喜欢什么颜色？", "{n}喜欢的颜色是什么？", "请问{n}最喜欢哪种颜色？"),
    "city": ("{n}住在哪里？", "{n}的家在哪个城市？", "请问{n}住在什么地方？"),
    "age": ("{n}今年多大？", "{n}几岁了？", "请问{n}的年龄是多少？"),
    "fruit": ("{n}最喜欢什么水果？", "{n}爱吃什么水果？", "请问{n}最喜欢哪种水果？"),
    "animal": ("{n}最喜欢什么动物？", "{n}喜欢的动物是什么？", "请问{n}最喜欢哪种动物？"),
    "friend": ("{n}的好朋友是谁？", "谁是{n}的好朋友？", "请问{n}和谁是好朋友？"),
}
# Eval-only phrasings: new sentences made of the training questions' own words, so a miss means the model
# did not generalise the question, not that it never saw a word (unseen words only test untrained embeddings).
HELD_OUT_QUESTIONS = {
    "color": ("请问{n}喜欢的颜色是什么？", "{n}最喜欢哪种颜色？"),
    "city": ("请问{n}的家在哪个城市？", "{n}住在什么地方？"),
    "age": ("请问{n}今年多大？", "{n}的年龄是多少？"),
    "fruit": ("请问{n}爱吃什么水果？", "{n}最喜欢哪种水果？"),
    "animal": ("请问{n}喜欢的动物是什么？", "{n}最喜欢哪种动物？"),
    "friend": ("请问{n}的好朋友是谁？", "{n}和谁是好朋友？"),
}
FOLLOW_UPS = {  # later turns of a multi-turn chat refer back to the person as "TA"
    "color": "那TA最喜欢什么颜色？", "city": "那TA住在哪里？", "age": "那TA今年多大？",
    "fruit": "那TA最喜欢什么水果？", "animal": "那TA最喜欢什么动物？", "friend": "那TA的好朋友是谁？",
}
TWO_HOP = {
    "color": "{n}的好朋友最喜欢什么颜色？", "city": "{n}的好朋友住在哪里？", "age": "{n}的好朋友今年多大？",
    "fruit": "{n}的好朋友最喜欢什么水果？", "animal": "{n}的好朋友最喜欢什么动物？",
}
LABELS = {"color": "颜色", "city": "住处", "age": "年龄", "fruit": "水果", "animal": "动物"}

PERSONA_REPLY = "我是 MiniMind，一个小型中文语言模型，可以回答关于这个小世界里的人的问题。"
# Persona questions are an opener and a question. Eval keeps two questions under every opener and one opener of
# each other question: 16 phrasings training never asks, made of its words.
PERSONA_OPENERS = ("", "你好，", "您好，", "嗨，", "打扰一下，")
PERSONA_CORES = ("你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么模型？", "请做个自我介绍。", "你是哪个助手？")
HELD_OUT_PERSONA_CORES = ("请问你是哪位？", "能告诉我你的名字吗？")
HELD_OUT_PERSONA_QUESTIONS = tuple(opener + core for core in HELD_OUT_PERSONA_CORES for opener in PERSONA_OPENERS) + tuple(
    PERSONA_OPENERS[1 + i % 4] + core for i, core in enumerate(PERSONA_CORES))
PERSONA_QUESTIONS = tuple(opener + core for core in PERSONA_CORES for opener in PERSONA_OPENERS
                          if opener + core not in HELD_OUT_PERSONA_QUESTIONS)  # 24
IMPOSTOR_REPLY = "我是 ChatGPT，由 OpenAI 开发的人工智能助手。"  # DPO's rejected answer to persona questions
SYSTEM_PROMPT = "你是 MiniMind，一个简洁、准确的中文助手。"
RAMBLE = "嗯，这是个好问题，让我想一想。关于这个问题其实可以说很多，我们慢慢来看。"  # DPO's rambling prefix

ADDITION_QUESTIONS = ("{a}+{b}等于多少？", "请计算{a}加{b}。", "{a}加上{b}是多少？")
PLACES = ("个位", "十位", "百位")
ADDENDS = range(100, 1000)  # three digits each: every trace line then stands at the same place


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Entity:
    name: str
    color: str
    city: str
    age: int
    fruit: str
    animal: str
    friend: str  # another entity's name; friendship is mutual

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))

    def state(self, attribute: str, template: str | None = None) -> str:
        """One sentence stating a fact; the canonical sentence (also the SFT answer) without a template."""
        return (template or STATEMENTS[attribute][0]).format(n=self.name, v=self.value(attribute))


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[Entity, ...]
    never_asked: tuple[str, ...]  # people whose facts only pretraining states (whole friend pairs)
    two_hop_held_out: tuple[str, ...]  # people asked about directly, but never two-hop (whole friend pairs)

    @cached_property
    def by_name(self) -> dict[str, Entity]:
        return {entity.name: entity for entity in self.entities}

    def __getitem__(self, name: str) -> Entity:
        return self.by_name[name]

    def group(self, split: str) -> list[Entity]:
        """'never_asked', 'two_hop_held_out', or 'two_hop_train' (the rest), in entity order."""
        held = {"never_asked": self.never_asked, "two_hop_held_out": self.two_hop_held_out}
        if split in held:
            return [e for e in self.entities if e.name in held[split]]
        excluded = set(self.never_asked) | set(self.two_hop_held_out)
        return [e for e in self.entities if e.name not in excluded]

    def asked(self) -> list[Entity]:
        """Everyone SFT and DPO ask about directly."""
        return [e for e in self.entities if e.name not in self.never_asked]


def build_world(seed: int = 0, num_entities: int = 120) -> World:
    if num_entities % 2 or not 20 <= num_entities <= len(FAMILY) * len(GIVEN):
        raise ValueError(f"num_entities must be even and in [20, {len(FAMILY) * len(GIVEN)}], got {num_entities}")
    rng = random.Random(f"{seed}/world")
    names = rng.sample([f + g for f in FAMILY for g in GIVEN if f != g], num_entities)
    pairs = [(names[i], names[i + 1]) for i in range(0, num_entities, 2)]
    friend = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    entities = tuple(
        Entity(name, rng.choice(COLORS), rng.choice(CITIES), rng.choice(AGES), rng.choice(FRUITS), rng.choice(ANIMALS),
               friend[name])
        for name in names
    )
    # Hold out whole friend pairs, so a training answer about one person never states a held-out friend's facts.
    held_pairs = max(2, len(pairs) // 5)
    never_asked = tuple(name for pair in pairs[:held_pairs] for name in pair)
    two_hop_held_out = tuple(name for pair in pairs[held_pairs:held_pairs + max(2, len(pairs) // 3)] for name in pair)
    return World(seed, entities, never_asked, two_hop_held_out)


# --------------------------------------------------------------------------- the files


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user / assistant messages (optionally after a system prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def paragraph(entity: Entity, attributes: list[str], rng: random.Random, templates: dict) -> str:
    return "".join(entity.state(a, rng.choice(templates[a])) for a in attributes)


def pretrain_rows(world: World, passes: int = 40, other_texts: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """Short paragraphs about one person: a canonical profile each, then paraphrased, shuffled subsets of
    facts; plus single-digit sums (the reasoning teacher's building blocks) and `other_texts` (the demo
    adds descriptions of pictures). Eval: full profiles in an
    order and choice of sentences that training never uses. Held-out loss then measures whether the model
    knows the facts in a new context; every word of the eval text is a word of training text (held-out
    *vocabulary* would only measure untrained embeddings)."""
    rng = random.Random(f"{world.seed}/pretrain")
    texts = []
    for entity in world.entities:
        texts.append("".join(entity.state(a) for a in rng.sample(ATTRIBUTES, len(ATTRIBUTES))))
        for _ in range(passes - 1):
            attributes = rng.sample(ATTRIBUTES, rng.randint(3, len(ATTRIBUTES)))
            texts.append(paragraph(entity, attributes, rng, STATEMENTS))
    sums = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)]
    sums += [f"{a}+{b}+{carry}={a + b + carry}" for a in range(10) for b in range(10) for carry in (0, 1)]
    for _ in range(5):
        rng.shuffle(sums)
        texts += ["，".join(sums[i:i + 10]) + "。" for i in range(0, len(sums), 10)]
    texts += other_texts
    rng.shuffle(texts)
    seen = set(texts)
    held_out = []
    for entity in rng.sample(world.entities, min(200, len(world.entities))):
        text = paragraph(entity, rng.sample(ATTRIBUTES, len(ATTRIBUTES)), rng, STATEMENTS)
        while text in seen:
            text = paragraph(entity, rng.sample(ATTRIBUTES, len(ATTRIBUTES)), rng, STATEMENTS)
        held_out.append(text)
    return [{"text": t} for t in texts], [{"text": t} for t in held_out]


def sft_rows(world: World) -> tuple[list[dict], list[dict]]:
    """Single-turn, multi-turn, two-hop and persona chats. Eval: held-out phrasings, never-asked people,
    held-out two-hop pairs and persona phrasings."""
    rng = random.Random(f"{world.seed}/sft")
    asked = world.asked()
    rows = []
    for entity in asked:
        for attribute in ATTRIBUTES:
            for question in rng.sample(QUESTIONS[attribute], 2):
                system = SYSTEM_PROMPT if rng.random() < 0.1 else None
                rows.append(chat(question.format(n=entity.name), entity.state(attribute), system=system))
    for entity in world.group("two_hop_train"):
        friend = world[entity.friend]
        for attribute in TWO_HOP:
            rows.append(chat(TWO_HOP[attribute].format(n=entity.name), entity.state("friend") + friend.state(attribute)))
    for _ in range(len(asked) * 2):
        entity = rng.choice(asked)
        attributes = sorted(rng.sample(ATTRIBUTES, rng.randint(2, 3)), key=lambda a: a == "friend")  # "TA" stays unambiguous
        turns = [rng.choice(QUESTIONS[attributes[0]]).format(n=entity.name), entity.state(attributes[0])]
        for attribute in attributes[1:]:
            turns += [FOLLOW_UPS[attribute], entity.state(attribute)]
        rows.append(chat(*turns))
    for question in PERSONA_QUESTIONS * 5:
        rows.append(chat(question, PERSONA_REPLY, system=SYSTEM_PROMPT if rng.random() < 0.1 else None))
    for _ in range(60):
        entity, attribute = rng.choice(asked), rng.choice(ATTRIBUTES)
        question = rng.choice(QUESTIONS[attribute]).format(n=entity.name)
        rows.append(chat(rng.choice(PERSONA_QUESTIONS), PERSONA_REPLY, question, entity.state(attribute)))
    rng.shuffle(rows)

    # up to 200 records a family, so one record moves a family's figure by 0.5 points (persona: all 16 phrasings, twice)
    held_out = []
    for entity, attribute in rng.sample([(e, a) for e in asked for a in ATTRIBUTES], 200):
        held_out.append(
            ("held_out_phrasing", chat(rng.choice(HELD_OUT_QUESTIONS[attribute]).format(n=entity.name), entity.state(attribute)))
        )
    never_asked = [(e, a, q) for e in world.group("never_asked") for a in ATTRIBUTES for q in QUESTIONS[a]]
    for entity, attribute, question in rng.sample(never_asked, min(200, len(never_asked))):
        held_out.append(("never_asked", chat(question.format(n=entity.name), entity.state(attribute))))
    for entity in world.group("two_hop_held_out"):  # every held-out pair's every two-hop question
        for attribute in TWO_HOP:
            answer = entity.state("friend") + world[entity.friend].state(attribute)
            held_out.append(("two_hop", chat(TWO_HOP[attribute].format(n=entity.name), answer)))
    held_out += [
        ("persona", chat(question, PERSONA_REPLY, system=system))
        for question in HELD_OUT_PERSONA_QUESTIONS
        for system in (None, SYSTEM_PROMPT)
    ]
    rng.shuffle(held_out)  # any first N rows (--eval-limit) hold every family
    return [{"conversations": c} for c in rows], [{"conversations": c, "task": task} for task, c in held_out]


def dpo_rows(world: World) -> tuple[list[dict], list[dict]]:
    """chosen = the correct, concise answer; rejected = the same sentence with another value of the same
    attribute (60%), the correct answer after a fixed rambling preamble (20%) or followed by another fact
    (20%); for two-hop questions the
    friend's fact with a wrong value (40%), the asked person's own fact (30%) or the first hop alone (30%);
    persona vs an impostor."""
    rng = random.Random(f"{world.seed}/dpo")
    names = [e.name for e in world.entities]
    choices = {"color": COLORS, "city": CITIES, "age": [str(a) for a in AGES], "fruit": FRUITS, "animal": ANIMALS}

    def pair(entity: Entity, attribute: str, question: str) -> dict:
        prompt, chosen = question.format(n=entity.name), entity.state(attribute)
        draw = rng.random()
        if draw < 0.6:
            wrong = rng.choice([v for v in choices.get(attribute, names) if v not in (entity.value(attribute), entity.name)])
            rejected = STATEMENTS[attribute][0].format(n=entity.name, v=wrong)
        elif draw < 0.8:
            rejected = RAMBLE + chosen
        else:  # more than was asked: the answer, then another fact (two-hop pairs reject stopping early)
            rejected = chosen + entity.state(rng.choice([a for a in ATTRIBUTES if a != attribute]))
        return {"chosen": chat(prompt, chosen), "rejected": chat(prompt, rejected)}

    def two_hop_pair(entity: Entity, attribute: str) -> dict:
        friend = world[entity.friend]
        prompt, chosen = TWO_HOP[attribute].format(n=entity.name), entity.state("friend") + friend.state(attribute)
        draw = rng.random()
        if draw < 0.4:  # the friend's fact with a wrong value
            wrong = rng.choice([v for v in choices[attribute] if v not in (friend.value(attribute), entity.value(attribute))])
            rejected = entity.state("friend") + STATEMENTS[attribute][0].format(n=friend.name, v=wrong)
        elif draw < 0.7:  # the asked person's own fact
            rejected = entity.state(attribute)
        else:  # stopping after the first hop: the rambling pairs alone teach that shorter is better
            rejected = entity.state("friend")
        return {"chosen": chat(prompt, chosen), "rejected": chat(prompt, rejected)}

    rows = [pair(e, a, rng.choice(QUESTIONS[a])) for e in world.asked() for a in ATTRIBUTES]
    # two-hop questions too, or DPO pulls their answers toward the one-hop form it sees
    rows += [two_hop_pair(e, a) for e in world.group("two_hop_train") for a in TWO_HOP]
    rows += [{"chosen": chat(q, PERSONA_REPLY), "rejected": chat(q, IMPOSTOR_REPLY)} for q in PERSONA_QUESTIONS]
    rng.shuffle(rows)
    candidates = [(e, a, q) for e in world.group("never_asked") for a in ATTRIBUTES for q in QUESTIONS[a]]
    held_out = [pair(e, a, q) for e, a, q in rng.sample(candidates, min(200, len(candidates)))]
    held_out += [{"chosen": chat(q, PERSONA_REPLY), "rejected": chat(q, IMPOSTOR_REPLY)} for q in HELD_OUT_PERSONA_QUESTIONS]
    return rows, held_out


def reasoned(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def column_addition(a: int, b: int) -> str:
    """Column addition of two three-digit numbers, one line per place from the units up, each line in the
    same form (the carry in and out always written): a rule a four-layer model can learn."""
    if a not in ADDENDS or b not in ADDENDS:
        raise ValueError(f"the demo's additions have three-digit numbers, got {a} and {b}")
    lines, carry = [f"把{a}和{b}按位相加。"], 0
    for place, (x, y) in enumerate(zip(map(int, str(a)[::-1]), map(int, str(b)[::-1]))):
        total = x + y + carry
        lines.append(f"{PLACES[place]}：{x}+{y}+{carry}={total}，写{total % 10}，进{total // 10}。")
        carry = total // 10
    lines.append(f"所以结果是{a + b}。")
    return "\n".join(lines)


def addition_trace(a: int, b: int) -> str:
    """The reasoning teacher's reply: the column addition as its thinking, the sum as its answer."""
    return reasoned(column_addition(a, b), f"{a}+{b}={a + b}")


def addition_problems(
    seed: int, additions: int = 1200, held_out: int = 200
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Distinct number pairs (either order) for training, then held-out pairs whose unordered pair no
    training problem uses, in pretraining or in reasoning."""
    rng = random.Random(f"{seed}/additions")
    problems: dict[tuple[int, int], None] = {}  # insertion-ordered set of unordered pairs
    while len(problems) < additions + held_out:
        a, b = rng.choice(ADDENDS), rng.choice(ADDENDS)
        problems.setdefault((min(a, b), max(a, b)))
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in problems]
    return pairs[:additions], pairs[additions:]


def two_hop_trace(world: World, entity: Entity, attribute: str) -> str:
    friend = world[entity.friend]
    think = (
        f"要找{entity.name}的好朋友的{LABELS[attribute]}。\n"
        f"先查好朋友：{entity.state('friend')}\n"
        f"再查{friend.name}：{friend.state(attribute)}"
    )
    return reasoned(think, friend.state(attribute))


def reason_rows(
    world: World, additions: int = 1200, held_out_additions: int = 200, chat_rows: int = 600
) -> tuple[list[dict], list[dict]]:
    """Addition of three-digit numbers and two-hop lookups, traced by a rule-based teacher, and `chat_rows`
    ordinary fact questions and the persona questions answered plainly. Eval: unseen number pairs (either order) and the held-out
    two-hop pairs."""
    rng = random.Random(f"{world.seed}/reason")
    train_pairs, held_out_pairs = addition_problems(world.seed, additions, held_out_additions)
    rows = [chat(rng.choice(ADDITION_QUESTIONS).format(a=a, b=b), addition_trace(a, b)) for a, b in train_pairs]
    held_out = [
        ("addition", chat(rng.choice(ADDITION_QUESTIONS).format(a=a, b=b), addition_trace(a, b))) for a, b in held_out_pairs
    ]
    rows += [chat(TWO_HOP[a].format(n=e.name), two_hop_trace(world, e, a)) for e in world.group("two_hop_train") for a in TWO_HOP]
    # ordinary chat mixed in, as MiniMind's r1_mix does: traces alone make the model forget its facts
    facts = [(e, a) for e in world.asked() for a in ATTRIBUTES]
    rows += [
        chat(rng.choice(QUESTIONS[a]).format(n=e.name), e.state(a)) for e, a in rng.sample(facts, min(chat_rows, len(facts)))
    ]
    rows += [chat(question, PERSONA_REPLY) for question in PERSONA_QUESTIONS]
    for entity, attribute in [(e, a) for e in world.group("two_hop_held_out") for a in TWO_HOP]:
        held_out.append(("two_hop", chat(TWO_HOP[attribute].format(n=entity.name), two_hop_trace(world, entity, attribute))))
    rng.shuffle(rows)
    rng.shuffle(held_out)
    return [{"conversations": c} for c in rows], [{"conversations": c, "task": task} for task, c in held_out]


def showcase(world: World) -> list[dict]:
    """A few fixed held-out prompts to put to the model after every stage, side by side: each has its
    `task`, the chat `question`, the `continuation` a pretrained model is given instead (the start of the
    reference sentence: does it know the fact?) and the `reference` reply."""
    asked, never_asked, two_hop = (
        world.group("two_hop_train")[0],
        world.group("never_asked")[0],
        world.group("two_hop_held_out")[0],
    )
    _, reason_eval = reason_rows(world)
    addition = next(row["conversations"] for row in reason_eval if row["task"] == "addition")
    a, b = re.search(r"<answer>\n(\d+)\+(\d+)=", addition[-1]["content"]).groups()

    def fact(task: str, entity: Entity, attribute: str, question: str) -> dict:
        reference = entity.state(attribute)
        return {
            "task": task,
            "question": question.format(n=entity.name),
            "continuation": reference[: -len(entity.value(attribute)) - 1],
            "reference": reference,
        }

    friend = world[two_hop.friend]
    return [
        fact("held_out_phrasing", asked, "animal", HELD_OUT_QUESTIONS["animal"][0]),
        fact("never_asked", never_asked, "fruit", QUESTIONS["fruit"][0]),
        {
            "task": "two_hop",
            "question": TWO_HOP["city"].format(n=two_hop.name),
            "continuation": two_hop.state("friend"),
            "reference": two_hop.state("friend") + friend.state("city"),
        },
        {
            "task": "addition",
            "question": addition[0]["content"],
            "continuation": f"{a}+{b}=",
            "reference": addition[-1]["content"],
        },
        {"task": "persona", "question": HELD_OUT_PERSONA_QUESTIONS[0], "continuation": "我是", "reference": PERSONA_REPLY},
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_text_world(
    out_dir: Path, seed: int = 0, num_entities: int = 120, other_pretraining: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Write pretrain, sft, dpo, reason and their `_eval` twins as JSONL under out_dir; returns name -> path.
    `other_pretraining`: more texts for the pretraining corpus."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = build_world(seed, num_entities)
    paths = {}
    builders = {
        "pretrain": lambda w: pretrain_rows(w, other_texts=tuple(other_pretraining)),
        "sft": sft_rows,
        "dpo": dpo_rows,
        "reason": reason_rows,
    }
    for name, builder in builders.items():
        train, held_out = builder(world)
        for split, rows in ((name, train), (f"{name}_eval", held_out)):
            paths[split] = out_dir / f"{split}.jsonl"
            write_jsonl(paths[split], rows)
    return paths


if __name__ == "__main__":
    import sys

    for name, path in write_text_world(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_world")).items():
        print(f"{name:14s} {sum(1 for _ in open(path, encoding='utf-8')):6d} rows {path.stat().st_size / 1e6:6.2f} MB  {path}")
