"""The driver's held-out evaluation scores rows exactly as the stage trains on them: at its `seq_len`."""

import json

import pytest

from conftest import random_model
from minimind.demo.evaluate import heldout_loss, pair_logps, preference_wins
from minimind.runner import eval_coverage, evaluate
from minimind.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["小明喜欢红色。小红住在北京。12 加 30 等于 42。"] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(vocab_size=len(tokenizer))


def chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_heldout_loss_uses_the_stage_seq_len_and_reports_cut_and_dropped_rows(tmp_path, tokenizer, model):
    records = [
        {"conversations": chat("小明喜欢什么？", "红色。")},  # fits
        {"conversations": chat("小红住在哪？", "小红住在北京。" * 6)},  # the reply is cut
        {"conversations": chat("小明喜欢红色。" * 8 + "小明喜欢什么？", "红色。")},  # the prompt fills the row: dropped
    ]
    path = write_jsonl(tmp_path / "sft_eval.jsonl", records)
    seq_len = 100  # the first row is exactly 100 tokens (the template adds a system prompt)
    metrics, _ = evaluate("sft", model, tokenizer, path, limit=10, seq_len=seq_len)
    assert metrics["eval/heldout_loss"] == pytest.approx(heldout_loss(model, tokenizer, path, kind="sft", seq_len=seq_len))
    assert metrics["eval/heldout_loss"] != pytest.approx(heldout_loss(model, tokenizer, path, kind="sft", seq_len=256))
    assert eval_coverage("sft", tokenizer, path, limit=10, seq_len=seq_len) == {"eval/rows": 2, "eval/rows_cut": 2, "eval/rows_dropped": 1}
    assert eval_coverage("sft", tokenizer, path, limit=10, seq_len=256) == {"eval/rows": 3, "eval/rows_cut": 0, "eval/rows_dropped": 0}
    assert eval_coverage("sft", tokenizer, path, limit=1, seq_len=seq_len)["eval/rows"] == 1  # the limit counts records, first to last


def test_dpo_pairs_are_scored_at_the_stage_seq_len(tmp_path, tokenizer, model):
    pair = {"chosen": chat("小明喜欢什么？", "红色。" * 30), "rejected": chat("小明喜欢什么？", "北京。" * 30)}
    path = write_jsonl(tmp_path / "dpo_eval.jsonl", [pair, pair])
    metrics, _ = evaluate("dpo", model, tokenizer, path, limit=10, seq_len=120, reference=model)
    assert metrics["eval/preference_accuracy"] == preference_wins(*pair_logps(model, tokenizer, path, seq_len=120))["accuracy"]
    assert eval_coverage("dpo", tokenizer, path, limit=10, seq_len=120)["eval/rows_cut"] == 2
    assert eval_coverage("dpo", tokenizer, path, limit=10, seq_len=512)["eval/rows_cut"] == 0
