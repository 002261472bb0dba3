"""The data report's contamination check: 13-gram overlap of training records with evaluation documents, over
the preparation's Ray tasks, each dirty document traced to the file line where its first shared 13-gram is."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minimind.data.contamination import EvalSet, Overlap, contamination_report, gram_hashes, units
from minimind.data.prepare import check_contamination

QUESTION = "小明今年几岁了？他住在哪个城市，最喜欢吃什么水果呢？ 小明今年九岁，住在杭州，最喜欢吃苹果。"
HALF = "请问海边的灯塔每天晚上几点亮起来？ 晚上七点。 This line shares nothing else at all with the data"


def test_units_ignore_case_spacing_and_punctuation_and_short_documents_cannot_be_checked():
    assert units("Hello,  WORLD! 你好。abc123 x_y") == ["hello", "world", "你", "好", "abc123", "x", "y"]
    assert (gram_hashes("小明今年九岁，住在杭州，最喜欢吃苹果") == gram_hashes("小明 今年九岁 住在杭州。。最喜欢吃苹果！")).all()
    assert len(gram_hashes("一二三四五六七八九十一二")) == 0 and len(gram_hashes("一二三四五六七八九十一二三")) == 1
    evaluation = EvalSet({"quiz": [QUESTION, "太短了"]})
    found = Overlap()
    found.add(evaluation, "无关。" + QUESTION[-20:], (3, 7))
    found.add(evaluation, QUESTION[-20:], (1, 9))
    report = contamination_report(evaluation, Overlap.merge([found, Overlap()]))
    quiz = report["tasks"]["quiz"]
    assert (quiz["docs"], quiz["checked"], quiz["too_short"], quiz["dirty"]) == (2, 1, 1, 1)
    assert 0 < quiz["worst"][0]["overlap"] < 1 and quiz["worst"][0]["found_at"] == "(1, 9)"  # the earliest record


def sft_record(question: str, answer: str) -> dict:
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_each_dirty_document_is_traced_to_its_file_line_across_chunks(ray_cluster, tmp_path):
    records = [sft_record(f"第{i}个问题：今天天气怎么样？", f"第{i}个回答：今天是晴天。") for i in range(60)]
    records[47] = sft_record("小明今年几岁了？他住在哪个城市，最喜欢吃什么水果呢？", "小明今年九岁，住在杭州，最喜欢吃苹果！")
    records[52] = sft_record("请问海边的灯塔每天晚上几点亮起来？", "晚上七点。")
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    clean = "一个与训练数据毫无关系的问题，它的答案也完全不同，所以是干净的。"
    evaluation = EvalSet({"quiz": [QUESTION, HALF, clean], "tiny": ["是吗 是的"]})
    said = []
    report = check_contamination(str(source), "sft", evaluation, str(tmp_path), chunk_bytes=2_000, say=said.append)
    quiz, tiny = report["tasks"]["quiz"], report["tasks"]["tiny"]
    assert (quiz["checked"], quiz["dirty"], tiny["checked"], tiny["too_short"]) == (3, 2, 0, 1)
    assert [(example["doc"], example["found_at"]) for example in quiz["worst"]] == [(0, "sft.jsonl:48"), (1, "sft.jsonl:53")]
    assert quiz["worst"][0]["overlap"] == 1.0 and 0 < quiz["worst"][1]["overlap"] < 1
    assert report["flags"] == ["contamination: quiz: 2 of its 3 checked documents (66.7%) share a 13-gram with this data"]
    assert json.loads((tmp_path / "contamination.json").read_text()) == report
    assert "[prepare] quiz: 2 of 3 checked documents share a 13-gram with sft.jsonl (66.7%; 0 too short to check)" in said


def test_the_prepare_job_checks_harness_tasks_named_by_eval_tasks(ray_cluster, tmp_path, monkeypatch, capsys):
    from minimind.demo import demo_data, demo_tokenizer

    spec = importlib.util.spec_from_file_location("prepare_job", Path(__file__).resolve().parents[1] / "jobs" / "prepare.py")
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "prepare_job", job)  # dataclasses look their module up there
    spec.loader.exec_module(job)
    with open(demo_data()["sft"], encoding="utf-8") as file:  # the demo's SFT file asks many of the facts task's questions
        (tmp_path / "sft.jsonl").write_text("".join(file.readlines()[:400]), encoding="utf-8")
    prepared = job.main(["--stage", "sft", "--data", str(tmp_path / "sft.jsonl"), "--tokenizer", str(demo_tokenizer()),
                         "--storage-path", str(tmp_path / "ray"), "--eval-tasks", "minimind_demo"])
    report = json.loads(Path(prepared.location, "contamination.json").read_text())
    assert set(report["tasks"]) == {"minimind_demo_facts", "minimind_demo_addition"}  # the tag, expanded
    facts = report["tasks"]["minimind_demo_facts"]
    assert facts["docs"] == facts["checked"] == 720 and facts["dirty"] > 0
    assert facts["worst"][0]["found_at"].startswith("sft.jsonl:")
    assert "contamination report:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown harness task"):
        job.main(["--stage", "sft", "--data", str(tmp_path / "sft.jsonl"), "--tokenizer", str(demo_tokenizer()),
                  "--storage-path", str(tmp_path / "ray"), "--eval-tasks", "no_such_task"])


def test_parquet_data_is_checked_through_ray_data(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minimind.data.parquet import check_contamination_parquet

    question, answer = QUESTION.split(" ")
    conversations = [json.dumps(sft_record(f"第{i}个问题：今天天气怎么样？", "晴天。")["conversations"], ensure_ascii=False)
                     for i in range(30)]
    conversations[17] = json.dumps(sft_record(question, answer)["conversations"], ensure_ascii=False)
    conversations[20] = "not json"  # passed over: preparation stops at it or counts it
    pq.write_table(pa.table({"conversations": conversations}), tmp_path / "sft.parquet", row_group_size=8)
    report = check_contamination_parquet(str(tmp_path / "sft.parquet"), "sft", EvalSet({"quiz": [QUESTION, HALF]}),
                                         str(tmp_path))
    quiz = report["tasks"]["quiz"]
    assert (quiz["checked"], quiz["dirty"]) == (2, 1) and quiz["worst"][0]["overlap"] == 1.0
    assert "sft.parquet: the row beginning" in quiz["worst"][0]["found_at"] and "小明今年几岁了" in quiz["worst"][0]["found_at"]
    assert json.loads((tmp_path / "contamination.json").read_text()) == report
