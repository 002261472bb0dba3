"""A small synthetic picture world for MiniMind-V on a CPU: each image shows one to four flat shapes
(circle, square, triangle, star) in five distinct colours, one shape per coarse position (the four
corners and the middle) on a plain light background, drawn with Pillow. From it come MiniMind-V's JSONL
files: captions for vision-language pretraining and short question/answer turns for SFT (counts,
colours, positions, yes/no), a small share of them about two images and a few text-only.

Held out: eval images are drawn apart and no eval scene equals a training scene, so no eval picture was
seen in training, pixel for pixel (with the defaults nearly every one-shape scene is a training scene, so
eval scenes have two to four shapes). Every question family also keeps one phrasing for eval only, asked
by half of the eval records ("template": "held_out"). Answers are canonical strings computed from the
scene, so each eval record's final assistant message is its reference answer for exact match.

Everything follows from `seed` through `random.Random`: the same seed writes byte-identical JSONL and PNGs.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE = "<image>"  # MiniMind-V's placeholder: one per image, in the order of the record's "image" list
BACKGROUND = (240, 240, 240)
COLOURS = {  # name -> (Chinese, RGB), far from each other and from the background
    "red": ("红色", (220, 30, 30)),
    "green": ("绿色", (30, 160, 60)),
    "blue": ("蓝色", (30, 80, 220)),
    "yellow": ("黄色", (235, 195, 20)),
    "purple": ("紫色", (140, 50, 180)),
}
KINDS = {"circle": "圆形", "square": "方形", "triangle": "三角形", "star": "星形"}
POSITIONS = {  # name -> (Chinese, centre as fractions of the image side), in reading order
    "top_left": ("左上方", (0.22, 0.22)),
    "top_right": ("右上方", (0.78, 0.22)),
    "middle": ("中间", (0.5, 0.5)),
    "bottom_left": ("左下方", (0.22, 0.78)),
    "bottom_right": ("右下方", (0.78, 0.78)),
}
IMAGE_SIZE = 64  # pixels a side
NUM_TRAIN, NUM_EVAL = 2000, 400  # pictures; 400 held out so that one record of a question family is under 2 points
RADIUS = 0.13  # of the image side: corner shapes end at 0.35 and the middle one starts at 0.37, so none overlap
NUMERALS = "零一两三四五六七八"  # up to two images of four shapes


@dataclass(frozen=True)
class Shape:
    kind: str  # a key of KINDS
    colour: str  # a key of COLOURS
    position: str  # a key of POSITIONS

    @property
    def words(self) -> str:
        return f"{COLOURS[self.colour][0]}的{KINDS[self.kind]}"  # 红色的圆形


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # at distinct positions, in reading order

    def __post_init__(self):
        if len({s.position for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes share a position")

    def count(self, kind: str | None = None, colour: str | None = None) -> int:
        return sum((kind in (None, s.kind)) and (colour in (None, s.colour)) for s in self.shapes)

    def at(self, position: str) -> Shape | None:
        return next((s for s in self.shapes if s.position == position), None)


def random_scene(rng: random.Random) -> Scene:
    positions = sorted(rng.sample(list(POSITIONS), rng.randint(1, 4)), key=list(POSITIONS).index)
    return Scene(tuple(Shape(rng.choice(list(KINDS)), rng.choice(list(COLOURS)), p) for p in positions))


def sample_scenes(seed: int, num_train: int, num_eval: int) -> tuple[list[Scene], list[Scene]]:
    """Training scenes, then distinct eval scenes that are none of the training ones."""
    rng = random.Random(seed)
    train = [random_scene(rng) for _ in range(num_train)]
    seen, held_out = set(train), []
    while len(held_out) < num_eval:
        scene = random_scene(rng)
        if scene not in seen:
            seen.add(scene)
            held_out.append(scene)
    return train, held_out


def eval_scenes(seed: int = 0, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL) -> dict[str, Scene]:
    """What each held-out picture of `write_image_world` (same arguments) holds, by file name."""
    _, held_out = sample_scenes(seed, num_train, num_eval)
    return {f"eval_{i:05d}.png": scene for i, scene in enumerate(held_out)}


def draw_scene(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Flat colours without anti-aliasing, so the pixel at a shape's centre is exactly its colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = RADIUS * image_size
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position][1]
        x, y, fill = fx * image_size, fy * image_size, COLOURS[shape.colour][1]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            half = 0.85 * r  # about the circle's area
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
        else:  # a five-pointed star: ten vertices alternating between the outer and an inner radius
            radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
            angles = [math.pi * (i / 5 - 0.5) for i in range(10)]
            draw.polygon([(x + d * math.cos(a), y + d * math.sin(a)) for d, a in zip(radii, angles)], fill=fill)
    return image


# --------------------------------------------------------------------------- questions and answers


def amount(n: int) -> str:
    return f"{NUMERALS[n]}个。" if n else "没有。"


def caption(scene: Scene) -> str:
    if len(scene.shapes) == 1:
        shape = scene.shapes[0]
        return f"图中有一个{shape.words}，在{POSITIONS[shape.position][0]}。"
    parts = "，".join(f"{POSITIONS[s.position][0]}是一个{s.words}" for s in scene.shapes)
    return f"图中有{NUMERALS[len(scene.shapes)]}个图形：{parts}。"


def named_things(text: str) -> set[str]:
    """The shape kinds, colours and shape counts ("两个图形", "三个圆形") a text names, as words of the world."""
    names = {word for word in (*KINDS.values(), *(c for c, _ in COLOURS.values())) if word in text}
    names |= set(re.findall(rf"[{NUMERALS[1:]}]个(?:图形|{'|'.join(KINDS.values())})", text))
    return names


def hallucinations(reply: str, scene: Scene) -> set[str]:
    """What a reply about an image names that the image does not hold: a kind or colour not drawn, or a
    count that is wrong (a count of the whole picture or of one kind)."""
    held = {KINDS[s.kind] for s in scene.shapes} | {COLOURS[s.colour][0] for s in scene.shapes}
    held |= {f"{NUMERALS[len(scene.shapes)]}个图形"} | {f"{NUMERALS[scene.count(kind=k)]}个{word}" for k, word in KINDS.items()}
    return named_things(reply) - held


def picture_descriptions(seed: int = 0, count: int = 1000, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL) -> list[str]:
    """Descriptions of random scenes, none of them a held-out picture's, as plain text for the language
    model's pretraining corpus. A real LLM knows how pictures are described before it sees one; without
    these the demo's LLM has never read a word of the picture world, and VLM pretraining, which trains the
    projection alone, has no words to map the pictures to."""
    rng = random.Random(f"{seed}/descriptions")
    held_out = set(sample_scenes(seed, num_train, num_eval)[1])
    texts = []
    while len(texts) < count:
        if (scene := random_scene(rng)) not in held_out:
            texts.append(caption(scene))
    return texts


TEMPLATES = {  # task -> (phrasings used in training, the phrasing kept for eval)
    "caption": (("描述这张图片。", "图里有什么？", "请简单描述一下这张图。", "这张图片里画了什么？"), "说说你在图中看到了什么。"),
    "count_kind": (("图中有几个{kind}？", "数一数图里有多少个{kind}。"), "这张图里一共有多少个{kind}？"),
    "count_colour": (("图中有几个{colour}的图形？",), "{colour}的图形一共有几个？"),
    "count_all": (("图中一共有几个图形？", "图里画了几个图形？"), "这张图包含多少个图形？"),
    "colour_of": (("图中的{kind}是什么颜色？",), "那个{kind}是什么颜色的？"),
    "where_is": (("{colour}的{kind}在哪里？", "{colour}的{kind}在图片的什么位置？"), "{colour}的{kind}位于哪个位置？"),
    "what_at": (("{position}是什么图形？",), "图片{position}画的是什么？"),
    "yes_no": (("图中有{colour}的{kind}吗？",), "这张图里是否有{colour}的{kind}？"),
    "pair_count": (("两张图片里一共有几个{kind}？",), "这两张图中{kind}加起来有几个？"),
    "which_image": (("哪张图片里有{colour}的{kind}？",), "{colour}的{kind}出现在哪张图片里？"),
}
SINGLE_TASKS = ("count_kind", "count_colour", "count_all", "colour_of", "where_is", "what_at", "yes_no")
PAIR_TASKS = ("pair_count", "which_image")
TEXT_ONLY = [  # a few turns without an image, as MiniMind-V mixes in
    ("三角形有几条边？", "三条。"),
    ("方形有几个角？", "四个。"),
    ("圆形有角吗？", "没有。"),
    ("星形有几个尖角？", "五个。"),
    ("红色和黄色混在一起是什么颜色？", "橙色。"),
    ("蓝色和黄色混在一起是什么颜色？", "绿色。"),
    ("左上方的对角是哪里？", "右下方。"),
    ("右上方的对角是哪里？", "左下方。"),
]


def pick_present(rng: random.Random, present: list, everything: list, share: float = 0.7):
    """Mostly ask about what is in the picture, so answers are not mostly "没有"."""
    return rng.choice(present if rng.random() < share else everything)


def slots(kind: str | None = None, colour: str | None = None, position: str | None = None) -> dict[str, str]:
    """The Chinese words a question template is filled with."""
    words = {"kind": KINDS.get(kind), "colour": COLOURS.get(colour, ("",))[0], "position": POSITIONS.get(position, ("",))[0]}
    return {slot: word for slot, word in words.items() if word}


def ask(task: str, scenes: tuple[Scene, ...], rng: random.Random) -> tuple[dict[str, str], str] | None:
    """Slot words for the question and its canonical answer; None where the task does not fit the scene."""
    scene, shapes = scenes[0], [s for scene in scenes for s in scene.shapes]
    if task == "caption":
        return {}, caption(scene)
    if task == "count_kind":
        kind = pick_present(rng, [s.kind for s in shapes], list(KINDS))
        return slots(kind=kind), amount(scene.count(kind=kind))
    if task == "count_colour":
        colour = pick_present(rng, [s.colour for s in shapes], list(COLOURS))
        return slots(colour=colour), amount(scene.count(colour=colour))
    if task == "count_all":
        return {}, amount(len(shapes))
    if task == "colour_of":  # only about a kind drawn once, so the answer is one colour
        unique = [s for s in shapes if scene.count(kind=s.kind) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return slots(kind=shape.kind), f"{COLOURS[shape.colour][0]}。"
    if task == "where_is":  # only about a coloured kind drawn once, so the answer is one position
        unique = [s for s in shapes if scene.count(s.kind, s.colour) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return slots(shape.kind, shape.colour), f"在{POSITIONS[shape.position][0]}。"
    if task == "what_at":
        position = pick_present(rng, [s.position for s in shapes], list(POSITIONS))
        shape = scene.at(position)
        return slots(position=position), f"一个{shape.words}。" if shape else "什么也没有。"
    if task == "yes_no":
        if rng.random() < 0.5:  # half about a drawn shape, half about any (mostly absent) one
            kind, colour = (shape := rng.choice(shapes)).kind, shape.colour
        else:
            kind, colour = rng.choice(list(KINDS)), rng.choice(list(COLOURS))
        return slots(kind, colour), "有。" if scene.count(kind, colour) else "没有。"
    if task == "pair_count":
        kind = pick_present(rng, [s.kind for s in shapes], list(KINDS), share=0.8)
        return slots(kind=kind), amount(sum(scene.count(kind=kind) for scene in scenes))
    if task == "which_image":  # about a shape drawn in at least one of the two
        s = rng.choice(shapes)
        first, second = (scene.count(s.kind, s.colour) > 0 for scene in scenes)
        return slots(s.kind, s.colour), "两张都有。" if first and second else "第一张。" if first else "第二张。"
    raise KeyError(task)


def turn(task: str, scenes: tuple[Scene, ...], rng: random.Random, held_out: bool = False) -> tuple[str, str] | None:
    asked = ask(task, scenes, rng)
    if asked is None:
        return None
    words, answer = asked
    train_templates, eval_template = TEMPLATES[task]
    return (eval_template if held_out else rng.choice(train_templates)).format(**words), answer


def record(turns: list[tuple[str, str]], images: list[str], **extra) -> dict:
    """A MiniMind-V record: the image placeholders open the first user message."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        prefix = f"{IMAGE}\n" * len(images) if i == 0 else ""
        conversations += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return {"conversations": conversations} | ({"image": ",".join(images)} if images else {}) | extra


def build_records(stage: str, names: list[str], scenes: list[Scene], rng: random.Random, evaluation: bool) -> list[dict]:
    """Pretrain: one caption per image. SFT: one to three questions per image, or on eval one question
    with the families in turn. A tenth as many two-image questions follow. On eval every other record of
    each family uses the held-out phrasing; training files also get the text-only turns, shuffled."""
    records, families = [], ("caption",) if stage == "pretrain" else SINGLE_TASKS

    def add(turns: list[tuple[str, str]], images: list[str], task: str, held_out: bool):
        tags = {"task": task, "template": "held_out" if held_out else "train"} if evaluation else {}
        records.append(record(turns, images, **tags))

    for i, (name, scene) in enumerate(zip(names, scenes)):
        if evaluation:  # rotate the families so each is asked about equally often; skip ones that don't fit
            held_out = (i // len(families)) % 2 == 1
            rotated = families[i % len(families):] + families[: i % len(families)]
            task, qa = next((t, qa) for t in rotated if (qa := turn(t, (scene,), rng, held_out)))
            add([qa], [name], task, held_out)
        else:
            turns = [qa for t in rng.sample(families, len(families)) if (qa := turn(t, (scene,), rng))]
            add(turns[: rng.randint(1, 3)], [name], "", False)
    pair_families = ("pair_count",) if stage == "pretrain" else PAIR_TASKS
    for i in range(len(names) // 10):
        a, b = rng.sample(range(len(names)), 2)
        task = pair_families[i % len(pair_families)] if evaluation else rng.choice(pair_families)
        held_out = evaluation and (i // len(pair_families)) % 2 == 1
        add([turn(task, (scenes[a], scenes[b]), rng, held_out)], [names[a], names[b]], task, held_out)
    if not evaluation:
        records += [record([qa], []) for qa in TEXT_ONLY]
        rng.shuffle(records)
    return records


def write_image_world(
    out_dir: Path, seed: int = 0, image_size: int = IMAGE_SIZE, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL
) -> dict[str, Path]:
    """Write images/ (train_*.png, eval_*.png) and the four JSONL files; returns name -> path."""
    out_dir, images = Path(out_dir), Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    train, held_out = sample_scenes(seed, num_train, num_eval)
    train_names = [f"train_{i:05d}.png" for i in range(num_train)]
    eval_names = list(eval_scenes(seed, num_train, num_eval))
    for name, scene in zip(train_names + eval_names, train + held_out):
        draw_scene(scene, image_size).save(images / name, format="PNG", compress_level=6)  # Pillow writes no timestamp

    paths = {}
    for stage in ("pretrain", "sft"):
        for suffix, names, scenes in (("", train_names, train), ("_eval", eval_names, held_out)):
            name = f"vlm_{stage}{suffix}"
            # one random stream per file, so changing one file's recipe leaves the others byte-identical
            records = build_records(stage, names, scenes, random.Random(f"{seed}/{name}"), evaluation=bool(suffix))
            paths[name] = out_dir / f"{name}.jsonl"
            with open(paths[name], "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return paths | {"images": images}


if __name__ == "__main__":  # python -m minimind.demo.images OUT_DIR
    for name, path in write_image_world(Path(sys.argv[1])).items():
        size = len(list(path.iterdir())) if path.is_dir() else sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name:18s} {size:6d} {'files' if path.is_dir() else 'records'}  {path}")
