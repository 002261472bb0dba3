import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from minimind.demo.images import (
    BACKGROUND,
    COLOURS,
    IMAGE,
    KINDS,
    PAIR_TASKS,
    POSITIONS,
    SINGLE_TASKS,
    TEMPLATES,
    Scene,
    Shape,
    draw_scene,
    sample_scenes,
    write_image_world,
)

SEED, SIZE, NUM_TRAIN, NUM_EVAL = 3, 48, 120, 40
FILES = ("vlm_pretrain", "vlm_pretrain_eval", "vlm_sft", "vlm_sft_eval")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_image_world(tmp_path_factory.mktemp("world"), seed=SEED, image_size=SIZE, num_train=NUM_TRAIN, num_eval=NUM_EVAL)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def images_of(record: dict) -> list[str]:
    return record["image"].split(",") if "image" in record else []


def turns(record: dict) -> list[tuple[str, str]]:
    messages = record["conversations"]
    return [(q["content"].replace(IMAGE + "\n", ""), a["content"]) for q, a in zip(messages[::2], messages[1::2])]


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_image_world(tmp_path / name, seed=seed, image_size=32, num_train=30, num_eval=10)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 4 + 40 and a == b
    assert set(a) == set(c)
    for name in FILES:
        assert a[f"{name}.jsonl"] != c[f"{name}.jsonl"]
    assert any(a[name] != c[name] for name in a if name.endswith(".png"))


def test_records_parse_and_every_image_placeholder_has_an_image(world):
    for name in FILES:
        records = read(world[name])
        assert records
        for record in records:
            messages = record["conversations"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) and messages
            assert all(m["content"].strip() for m in messages)
            images = images_of(record)
            assert sum(m["content"].count(IMAGE) for m in messages) == len(images)
            assert messages[0]["content"].startswith(f"{IMAGE}\n" * len(images))
            for image in images:
                with Image.open(world["images"] / image) as opened:
                    assert opened.mode == "RGB" and opened.size == (SIZE, SIZE)
    pretrain = read(world["vlm_pretrain"])
    assert sum(len(images_of(r)) == 2 for r in pretrain) == NUM_TRAIN // 10
    assert 0 < sum("image" not in r for r in pretrain) < len(pretrain) // 10


def test_eval_images_are_new_files_and_new_pictures(world):
    def used(names):
        return {image for name in names for record in read(world[name]) for image in images_of(record)}

    train, held_out = used(["vlm_pretrain", "vlm_sft"]), used(["vlm_pretrain_eval", "vlm_sft_eval"])
    assert len(train) == NUM_TRAIN and len(held_out) == NUM_EVAL and not train & held_out

    def digests(images):  # pixel content, so a redrawn training scene under a new name also counts
        return {hashlib.sha256(Image.open(world["images"] / image).tobytes()).hexdigest() for image in images}

    assert not digests(train) & digests(held_out)


def template_pattern(template: str) -> re.Pattern:
    alternatives = {
        "kind": "|".join(KINDS.values()), "colour": "|".join(w for w, _ in COLOURS.values()),
        "position": "|".join(w for w, _ in POSITIONS.values()),
    }
    pattern = re.escape(template)
    for slot, words in alternatives.items():
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{words})")
    return re.compile(pattern)


def test_held_out_phrasings_never_appear_in_training(world):
    held_out = {task: template_pattern(eval_template) for task, (_, eval_template) in TEMPLATES.items()}
    for name in ("vlm_pretrain", "vlm_sft"):
        for record in read(world[name]):
            for question, _ in turns(record):
                assert not any(p.fullmatch(question) for p in held_out.values()), question
    for name in ("vlm_pretrain_eval", "vlm_sft_eval"):
        records = read(world[name])
        for record in records:
            question = turns(record)[-1][0]
            assert bool(held_out[record["task"]].fullmatch(question)) == (record["template"] == "held_out"), question
        assert {r["template"] for r in records} == {"train", "held_out"}
    assert {r["task"] for r in read(world["vlm_sft_eval"])} == set(SINGLE_TASKS + PAIR_TASKS)


# An oracle written apart from the generator: recount from the scenes behind each record.
WORD_TO = {word: key for table in (KINDS, {k: w for k, (w, _) in COLOURS.items()}, {k: w for k, (w, _) in POSITIONS.items()})
           for key, word in table.items()}
AMOUNTS = {"没有。": 0, "一个。": 1, "两个。": 2, "三个。": 3, "四个。": 4, "五个。": 5, "六个。": 6, "七个。": 7, "八个。": 8}


def has(scene: Scene, kind=None, colour=None, position=None) -> list[Shape]:
    return [s for s in scene.shapes if kind in (None, s.kind) and colour in (None, s.colour) and position in (None, s.position)]


def expected_answer(task: str, scenes: list[Scene], kind=None, colour=None, position=None) -> str | set | int:
    if task == "caption":
        return {(s.position, s.colour, s.kind) for s in scenes[0].shapes}
    if task in ("count_kind", "count_colour", "count_all", "pair_count"):
        return sum(len(has(scene, kind, colour)) for scene in scenes)
    if task == "colour_of":
        (shape,) = has(scenes[0], kind)
        return COLOURS[shape.colour][0] + "。"
    if task == "where_is":
        (shape,) = has(scenes[0], kind, colour)
        return f"在{POSITIONS[shape.position][0]}。"
    if task == "what_at":
        found = has(scenes[0], position=position)
        return f"一个{COLOURS[found[0].colour][0]}的{KINDS[found[0].kind]}。" if found else "什么也没有。"
    if task == "yes_no":
        return "有。" if has(scenes[0], kind, colour) else "没有。"
    if task == "which_image":
        first, second = (bool(has(scene, kind, colour)) for scene in scenes)
        return {(True, True): "两张都有。", (True, False): "第一张。", (False, True): "第二张。"}[(first, second)]
    raise KeyError(task)


def read_caption(text: str) -> set:
    words = r"(左上方|右上方|中间|左下方|右下方)", r"(\w+色)的(圆形|方形|三角形|星形)"
    if one := re.fullmatch(rf"图中有一个{words[1]}，在{words[0]}。", text):
        return {(WORD_TO[one[3]], WORD_TO[one[1]], WORD_TO[one[2]])}
    many = re.fullmatch(r"图中有(两|三|四)个图形：(.*)。", text)
    found = {(WORD_TO[m[1]], WORD_TO[m[2]], WORD_TO[m[3]]) for m in re.finditer(rf"{words[0]}是一个{words[1]}", many[2])}
    assert len(found) == "一两三四".index(many[1]) + 1
    return found


def test_every_answer_agrees_with_its_scene(world):
    train, held_out = sample_scenes(SEED, NUM_TRAIN, NUM_EVAL)
    scene_of = {f"train_{i:05d}.png": s for i, s in enumerate(train)} | {f"eval_{i:05d}.png": s for i, s in enumerate(held_out)}
    for image in list(scene_of)[:: 7]:  # the name -> scene map the oracle relies on is the one drawn
        assert Image.open(world["images"] / image).tobytes() == draw_scene(scene_of[image], SIZE).tobytes()
    patterns = [(task, template_pattern(t)) for task, (train_ts, eval_t) in TEMPLATES.items() for t in (*train_ts, eval_t)]
    checked = set()
    for name in FILES:
        for record in read(world[name]):
            scenes = [scene_of[image] for image in images_of(record)]
            for question, answer in turns(record) if scenes else []:
                task, match = next((task, m) for task, p in patterns if (m := p.fullmatch(question)))
                slots = {k: WORD_TO[v] for k, v in match.groupdict().items()}
                expected = expected_answer(task, scenes, **slots)
                got = read_caption(answer) if task == "caption" else AMOUNTS[answer] if isinstance(expected, int) else answer
                assert got == expected, (record, question)
                checked.add(task)
    assert checked == set(TEMPLATES)


@pytest.mark.parametrize("image_size", [64, 224])
def test_draw_scene_puts_each_colour_at_its_shape(image_size):
    def pixel(image, position):
        fx, fy = POSITIONS[position][1]
        return image.getpixel((int(fx * image_size), int(fy * image_size)))

    for kind in KINDS:
        for colour, (_, rgb) in COLOURS.items():
            for position in POSITIONS:
                image = draw_scene(Scene((Shape(kind, colour, position),)), image_size)
                assert pixel(image, position) == rgb
                assert all(pixel(image, other) == BACKGROUND for other in POSITIONS if other != position)
    crowded = Scene(tuple(Shape(k, c, p) for k, c, p in zip(KINDS, COLOURS, POSITIONS)))
    image = draw_scene(crowded, image_size)
    assert all(pixel(image, s.position) == COLOURS[s.colour][1] for s in crowded.shapes)
    assert image.getpixel((0, 0)) == BACKGROUND
    outlines = {draw_scene(Scene((Shape(kind, "red", "middle"),)), image_size).tobytes() for kind in KINDS}
    assert len(outlines) == len(KINDS)  # the kinds are told apart by shape, not only by name


def test_scene_rejects_two_shapes_in_one_place():
    with pytest.raises(ValueError, match="share a position"):
        Scene((Shape("circle", "red", "middle"), Shape("star", "blue", "middle")))


def test_hallucinations_are_what_a_reply_names_that_the_picture_does_not_hold():
    from minimind.demo.images import caption, eval_scenes, hallucinations

    scene = Scene((Shape("circle", "red", "top_left"), Shape("star", "blue", "middle")))
    assert hallucinations(caption(scene), scene) == set()
    assert hallucinations("一个红色的圆形。", scene) == set()  # "一个" here names a shape, not a count
    assert hallucinations("图中有三个图形：左上方是一个绿色的圆形，中间是一个蓝色的方形。", scene) == {"三个图形", "绿色", "方形"}
    assert hallucinations("两个圆形。", scene) == {"两个圆形"} and hallucinations("一个星形。", scene) == set()
    scenes = eval_scenes(0, num_train=50, num_eval=10)
    assert list(scenes) == [f"eval_{i:05d}.png" for i in range(10)]
    assert all(hallucinations(caption(s), s) == set() for s in scenes.values())
