import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from minimind.driver.evaluate import (
    answer_exact_match,
    image_question_accuracy,
    preference_accuracy,
    reasoning_scores,
    text_replier,
)
from minimind.model.tokenizer import train_tokenizer
from minimind.training.heldout import heldout_loss


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["小明喜欢红色。小红住在北京。12 加 30 等于 42。"] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(vocab_size=len(tokenizer))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def qa(question, answer):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_heldout_loss_is_the_mean_token_cross_entropy(tmp_path, tokenizer, model):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "小明喜欢红色。"}, {"text": "小红住在北京。"}])
    ids = tokenizer("<s>小明喜欢红色。</s><s>小红住在北京。</s>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    expected = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert heldout_loss(model, tokenizer, path, seq_len=64) == pytest.approx(expected, rel=1e-5)


def test_heldout_loss_of_chat_data_counts_only_the_replies(tmp_path, tokenizer, model):
    path = write_jsonl(tmp_path / "sft.jsonl", [qa("小明喜欢什么？", "红色。")])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "小明喜欢什么？"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(qa("小明喜欢什么？", "红色。")["conversations"], tokenize=True, return_dict=False)
    assert full[: len(prompt)] == prompt
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(ids).logits
    start, end = len(prompt), full.index(tokenizer.eos_token_id, len(prompt)) + 1  # the reply and its end-of-turn token
    expected = F.cross_entropy(logits[0, start - 1 : end - 1], ids[0, start:end]).item()
    assert len(full) < 256 and heldout_loss(model, tokenizer, path, kind="sft", seq_len=256) == pytest.approx(expected, rel=1e-5)


def test_exact_match_compares_replies_with_references(tmp_path):
    path = write_jsonl(tmp_path / "sft_eval.jsonl", [qa("小明喜欢什么？", "红色。"), qa("小红住在哪？", "北京。")])
    assert answer_exact_match(lambda prompts: ["红色。", "上海。"], path)["accuracy"] == 0.5
    assert answer_exact_match(lambda prompts: [" 红色。\n", "北京。"], path)["accuracy"] == 1.0


def test_text_replier_generates_from_the_chat_prompt(tmp_path, tokenizer, model):
    path = write_jsonl(tmp_path / "sft_eval.jsonl", [qa("小明喜欢什么？", "红色。")] * 3)
    result = answer_exact_match(text_replier(model, tokenizer, max_new_tokens=6), path)
    assert result["accuracy"] == 0.0  # an untrained model does not know
    (prompt, reply, reference), *_ = result["samples"]
    assert prompt == [{"role": "user", "content": "小明喜欢什么？"}] and isinstance(reply, str) and reference == "红色。"


def test_reasoning_scores_format_and_answer_separately(tmp_path, tokenizer):
    reference = "<think>\n12 加 30 等于 42\n</think>\n<answer>\n42\n</answer>"
    path = write_jsonl(tmp_path / "reason_eval.jsonl", [qa("12+30=?", reference)] * 3)
    replies = [reference, "<think>\n想错了\n</think>\n<answer>\n41\n</answer>", "42"]
    scores = reasoning_scores(lambda prompts: replies, path, tokenizer)
    assert scores["format"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(1 / 3)
    twice = "<think>\n12 加 30\n</think>\n等于 42\n</think>\n<answer>\n42\n</answer>"  # a second </think>, inside the first
    assert reasoning_scores(lambda prompts: [twice] * 3, path, tokenizer)["format"] == 0.0


def test_accuracy_is_also_reported_per_task_when_records_name_one(tmp_path, tokenizer):
    records = [
        qa("小明喜欢什么？", "红色。") | {"task": "asked"},
        qa("小红住在哪？", "北京。") | {"task": "asked"},
        qa("小刚几岁？", "八岁。") | {"task": "never_asked"},
        qa("你是谁？", "我是 MiniMind。"),
    ]
    path = write_jsonl(tmp_path / "sft_eval.jsonl", records)
    result = answer_exact_match(lambda prompts: ["红色。", "上海。", "八岁。", "我是 MiniMind。"], path)
    assert result["accuracy"] == 0.75 and result["by_task"] == {"asked": 0.5, "never_asked": 1.0}
    assert answer_exact_match(lambda prompts: ["红色。", "北京。"], path, limit=2)["by_task"] == {}  # one task: nothing to split
    reference = "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"
    path = write_jsonl(
        tmp_path / "reason_eval.jsonl",
        [qa("1+1?", reference) | {"task": "addition"}, qa("A的朋友？", reference) | {"task": "two_hop"}],
    )
    assert reasoning_scores(lambda prompts: [reference, "2"], path, tokenizer)["by_task"] == {"addition": 1.0, "two_hop": 0.0}


def test_preference_accuracy(tmp_path, tokenizer, model):
    prompt = [{"role": "user", "content": "小明喜欢什么？"}]
    pairs = [
        {"chosen": prompt + [{"role": "assistant", "content": c}], "rejected": prompt + [{"role": "assistant", "content": r}]}
        for c, r in [("红色。", "北京北京北京。"), ("42", "小红")]
    ]
    path = write_jsonl(tmp_path / "dpo_eval.jsonl", pairs)
    same = preference_accuracy(model, tokenizer, path, reference_model=model)
    assert same == {"accuracy": 0.0, "margin": 0.0, "drift": 0.0}  # policy == reference: every reward is zero
    alone = preference_accuracy(model, tokenizer, path)
    assert 0.0 <= alone["accuracy"] <= 1.0 and alone["margin"] != 0.0


def test_image_question_accuracy_hands_the_replier_each_image(tmp_path):
    record = {
        "conversations": [{"role": "user", "content": "<image>\n图中有几个圆形？"}, {"role": "assistant", "content": "两个。"}],
        "image": "eval_00001.png",
    }
    path = write_jsonl(tmp_path / "vlm_sft_eval.jsonl", [record, {**record, "image": "eval_00002.png"}])
    seen = []

    def replier(queries):
        seen.extend(images for _, images in queries)
        return ["两个。" if images[0].name == "eval_00001.png" else "三个。" for _, images in queries]

    assert image_question_accuracy(replier, path, tmp_path / "images")["accuracy"] == 0.5
    assert seen == [[tmp_path / "images" / "eval_00001.png"], [tmp_path / "images" / "eval_00002.png"]]
