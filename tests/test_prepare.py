"""Preparation over Ray Data: shards that read back as exactly today's rows, file:line errors, reuse,
resume across shard boundaries, and the data report."""

import json
import random
from functools import partial
from itertools import islice

import numpy as np
import pytest

from minimind.data import prepare as prepare_module
from minimind.data.prepare import prepare
from minimind.data.rows import DataFormatError, LengthGroupedBatches, StageData, collate, load_stage_dataset
from minimind.data.shards import PreparedRows

SMALL_CHUNKS = 20_000  # bytes: several shards even for the small files here


@pytest.fixture(scope="module")
def demo():
    from minimind.demo import demo_data, demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    return demo_data(), load_tokenizer(demo_tokenizer())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def head(source, destination, lines):
    """The first `lines` lines of a demo file, as a file of its own (keeps each test small)."""
    with open(source, encoding="utf-8") as file:
        destination.write_text("".join(islice(file, lines)), encoding="utf-8")
    return destination


@pytest.mark.parametrize("kind, name, seq_len", [
    ("pretrain", "pretrain", 64), ("sft", "sft", 96), ("reason", "reason", 256), ("dpo", "dpo", 128), ("vlm", "vlm_sft", 96),
])
def test_rows_read_back_from_shards_equal_the_rows_of_the_jsonl(ray_cluster, demo, tmp_path, kind, name, seq_len):
    paths, tokenizer = demo
    source = head(paths[name], tmp_path / f"{name}.jsonl", 600)
    stage = StageData(kind, seq_len=seq_len, tag_weight=7.0, image_tokens=4)
    prepared = prepare(str(source), tokenizer, stage, str(tmp_path / "prepared"), chunk_bytes=SMALL_CHUNKS)
    assert len(prepared.manifest["shards"]) > 3
    expected = load_stage_dataset(source, tokenizer, stage)
    rows = PreparedRows(prepared.location, tag_weight=7.0)
    assert len(rows) == len(expected) == prepared.manifest["rows"] > 0
    assert [rows[i] for i in range(len(rows))] == [expected[i] for i in range(len(expected))]  # ids, labels, weights, images
    assert rows.lengths().tolist() == [max(len(expected[i][key]) for key in expected.column_names if key.endswith("input_ids"))
                                       if kind != "pretrain" else expected[i]["length"] for i in range(len(expected))]
    ids = np.load(next((tmp_path / "prepared").glob(f"{kind}-*/shard-00000/*input_ids.npy")), mmap_mode="r")
    assert ids.dtype == np.uint16  # 2 bytes a token, not 8


def test_a_bad_line_names_the_files_line_across_chunks_or_is_skipped_and_counted(ray_cluster, demo, tmp_path):
    paths, tokenizer = demo
    lines = open(paths["sft"], encoding="utf-8").read().splitlines()[:300]
    lines.insert(250, '{"conversations": [{"role": "robot", "content": "x"}]}')  # line 251, past several chunks
    lines.insert(120, "")  # a blank line is no record, but it is a line
    source = tmp_path / "sft.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")  # BOM, CRLF
    stage = StageData("sft", seq_len=96)
    root = str(tmp_path / "prepared")
    with pytest.raises(DataFormatError, match=r"sft.jsonl:252: .*role 'robot'.* \(--skip-bad skips and counts such lines\)"):
        prepare(str(source), tokenizer, stage, root, chunk_bytes=SMALL_CHUNKS)
    with source.open("ab") as file:
        file.write(b'{"text": "caf\xe9"}\r\n')  # latin-1 at the end
    prepared = prepare(str(source), tokenizer, stage, root, skip_bad=True, chunk_bytes=SMALL_CHUNKS)
    assert prepared.manifest["skipped_lines"] == 2 and prepared.manifest["records"] == 300
    assert prepared.manifest["rows"] == len(load_stage_dataset(source, tokenizer, stage, skip_bad=True))
    with pytest.raises(
        DataFormatError, match=r"sft.jsonl:252: .*role 'robot'"
    ):  # prepared with --skip-bad is no licence without it
        prepare(str(source), tokenizer, stage, root, chunk_bytes=SMALL_CHUNKS)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not valid UTF-8"):
        prepare(str(latin1), tokenizer, StageData("pretrain", seq_len=8), root)


def test_a_format_error_is_an_error_but_a_blank_pretraining_text_is_left_out_and_reported(ray_cluster, demo, tmp_path):
    _, tokenizer = demo
    records = pretrain_records(40)
    records[10:10] = [{"text": " "}, {"text": ""}, {"text": "\n\t"}]  # the seed's noisy tail: no text, not a broken file
    source = write_jsonl(tmp_path / "blank.jsonl", records)
    stage = StageData("pretrain", seq_len=32)
    prepared = prepare(str(source), tokenizer, stage, str(tmp_path / "prepared"))
    report = prepared.report
    assert report["records"] == 43 and report["blank_skipped"] == 3 and prepared.manifest["skipped_lines"] == 0
    assert any(flag.startswith("blank: 3 records") for flag in report["flags"])
    expected = load_stage_dataset(source, tokenizer, stage)  # the in-process reader leaves them out too
    rows = PreparedRows(prepared.location)
    assert [rows[i] for i in range(len(rows))] == [expected[i] for i in range(len(expected))]

    wrong_type = write_jsonl(tmp_path / "wrong.jsonl", [*records[:5], {"text": 5}, *records[5:]])
    with pytest.raises(
        DataFormatError, match=r"wrong.jsonl:6: needs a string \"text\" \(--skip-bad skips and counts such lines\)"
    ):
        prepare(str(wrong_type), tokenizer, stage, str(tmp_path / "prepared"))


def test_a_bad_line_stops_the_preparation_without_waiting_for_the_other_chunks(ray_cluster):
    """`gather` takes chunk summaries as they finish: the first with a bad line cancels every task still
    running or waiting. Stand-ins for the chunk tasks: one fails at once, the others would take a minute
    (in short sleeps: a cancelled task stops when it next runs Python, as a chunk task does between batches)."""
    import time

    import ray

    from minimind.data.prepare import gather

    @ray.remote(num_cpus=1)
    def chunk(index, error, seconds):
        for _ in range(int(seconds / 0.1)):
            time.sleep(0.1)
        return {"index": index, "error": error}

    slow = [chunk.remote(index, None, 60) for index in (0, 2, 3)]  # two run on the two CPUs, one waits
    bad = chunk.options(num_cpus=0).remote(1, (7, "not JSON"), 0.2)
    began = time.monotonic()
    done = gather({ref: {"start": 0, "end": 1} for ref in [slow[0], bad, *slow[1:]]}, stop_at_error=True)
    assert time.monotonic() - began < 20 and done == [{"index": 1, "error": (7, "not JSON")}]
    for ref in slow:  # a cancelled task that was waiting may first need a worker process started (slow in a long session)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=50)  # under the 60 s an uncancelled task takes: one that ran to the end still fails this


def test_a_file_edited_in_the_middle_with_its_mtime_restored_is_prepared_again(ray_cluster, demo, tmp_path):
    """`cp -p`, `rsync -a` and `tar x` restore the mtime: the size, mtime, first and last MiB then match
    although the content differs. Spaces (valid JSON) put the edit 1 MiB from either end, cheaply."""
    import os

    from minimind.data.prepare import source_fingerprint

    _, tokenizer = demo
    padding = " " * (1 << 20)
    source = tmp_path / "edited.jsonl"
    source.write_text(
        f'{{"text": "山水 river"}}{padding}\n{{"text": "小猫 41 tea"}}\n{{"text": "故事 mountain"}}{padding}\n', encoding="utf-8"
    )
    original, stat = source.read_bytes(), source.stat()
    root, stage = str(tmp_path / "prepared"), StageData("pretrain", seq_len=16)

    def text_of(prepared):
        rows = PreparedRows(prepared.location)
        return tokenizer.decode([token for i in range(len(rows)) for token in rows[i]["input_ids"][: rows[i]["length"]]])

    first = prepare(str(source), tokenizer, stage, root)
    source.write_bytes(original.replace(b"41", b"42"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(str(source)) == first.manifest["source_fingerprint"]  # the cheap fingerprint cannot tell
    edited = prepare(str(source), tokenizer, stage, root)
    assert not edited.reused and edited.location != first.location
    assert "42" in text_of(edited) and "41" in text_of(first)
    assert prepare(str(source), tokenizer, stage, root).location == edited.location  # found again, by its content
    source.write_bytes(original)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare(str(source), tokenizer, stage, root)
    assert again.reused and again.location == first.location


def test_progress_shows_chunks_rate_and_eta_in_place_on_a_terminal_and_every_few_percent_in_a_log():
    import io

    from minimind.data.prepare import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream in (io.StringIO(), Terminal()):
        now = [0.0]
        progress = Progress("[prepare] preparing", 200_000_000, 40, stream=stream, clock=lambda: now[0], step=0.1, quiet_s=5)
        for _ in range(40):
            now[0] += 1
            progress.advance(5_000_000)
        progress.close()
        text = stream.getvalue()
        assert "[prepare] preparing: 5/40 chunks, 25/200 MB (12%), 5.0 MB/s, ETA 0m35s" in text  # nothing in the first 5 s
        assert " 4/40 chunks" not in text and "40/40 chunks, 200/200 MB (100%)" in text
        if isinstance(stream, Terminal):
            assert text.count("\r") == 36 and text.endswith("\n")
        else:
            assert len(text.splitlines()) == 10  # the first once 5 s passed (12%), then one at each 10% (20%, ..., 100%)


def test_the_same_inputs_are_prepared_once(ray_cluster, demo, tmp_path, monkeypatch):
    paths, tokenizer = demo
    source = head(paths["sft"], tmp_path / "sft.jsonl", 200)
    root = str(tmp_path / "prepared")
    first = prepare(str(source), tokenizer, StageData("sft", seq_len=96), root)
    monkeypatch.setattr(prepare_module, "_run", lambda *args: pytest.fail("Ray Data ran for inputs prepared already"))
    again = prepare(str(source), tokenizer, StageData("sft", seq_len=96), root)
    assert again.reused and again.location == first.location and again.manifest == first.manifest
    monkeypatch.undo()
    # anything that changes the rows is a new folder: the length, the file's content
    assert prepare(str(source), tokenizer, StageData("sft", seq_len=64), root).location != first.location
    source.write_text(source.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # one more (blank) line
    assert prepare(str(source), tokenizer, StageData("sft", seq_len=96), root).location != first.location


def test_resuming_mid_epoch_continues_at_the_exact_micro_batch_across_shards_and_epochs(ray_cluster, demo, tmp_path):
    from minimind.training.loop import micro_batches

    paths, tokenizer = demo
    source = head(paths["pretrain"], tmp_path / "pretrain.jsonl", 400)
    prepared = prepare(str(source), tokenizer, StageData("pretrain", seq_len=48), str(tmp_path / "prepared"), chunk_bytes=8_000)
    rows = PreparedRows(prepared.location)
    bounds = np.cumsum([s["tokens"] for s in prepared.manifest["shards"]])
    assert any(t % 48 for t in bounds[:-1])  # some rows really do start in one shard and end in the next
    loader = {"collate_fn": partial(collate, pad_id=tokenizer.pad_token_id), "num_workers": 0}
    batches = LengthGroupedBatches(rows.lengths().tolist(), batch_size=8, seed=3)
    per_epoch = len(batches)
    straight = list(islice(micro_batches(rows, batches, 0, loader), 2 * per_epoch + 3))
    for consumed in (5, per_epoch - 1, per_epoch + 2):
        resumed = list(islice(micro_batches(rows, batches, consumed, {**loader, "num_workers": 1}), 3))
        for a, b in zip(resumed, straight[consumed : consumed + 3]):
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) if hasattr(a[k], "equal") else a[k] == b[k] for k in a)


def pretrain_records(count, seed=0):
    rng = random.Random(seed)
    words = ["山", "水", "从前", "故事", "小猫", "river", "mountain", "tea"]
    return [{"text": "".join(rng.choice(words) for _ in range(rng.randint(5, 30)))} for _ in range(count)]


def test_the_report_flags_a_noisy_tail_counts_duplicates_and_drops_them_when_asked(ray_cluster, demo, tmp_path):
    _, tokenizer = demo
    records = pretrain_records(900)
    records += [records[5], records[7]] * 10  # 20 exact repeats
    noise = ["\ufffd\ufffd\x07", "1234 5678 !!!", "abc\x00\x01def", "\ufffd" * 12]
    records += [{"text": noise[i % len(noise)] + str(i)} for i in range(100)]  # the last ~10% of the file is garbage
    source = write_jsonl(tmp_path / "noisy.jsonl", records)
    root = str(tmp_path / "prepared")
    prepared = prepare(str(source), tokenizer, StageData("pretrain", seq_len=64), root, chunk_bytes=10_000)
    report = prepared.report
    assert report["records"] == 1020 and report["duplicates"] >= 20 and report["garbage"] == 100
    assert any(flag.startswith("noisy tail") for flag in report["flags"])
    assert report["tail_garbage_rate"] > 0.5 > 0.01 > report["rest_garbage_rate"]
    assert {"control_char", "replacement_char", "no_letters"} <= set(report["garbage_kinds"])
    assert sum(report["length_histogram"]["counts"]) == 1020  # one length per document
    folder = tmp_path / "prepared" / prepared.manifest["key"]
    assert json.loads((folder / "report.json").read_text())["flags"] == report["flags"]
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"

    clean = prepare(
        str(write_jsonl(tmp_path / "clean.jsonl", pretrain_records(900))), tokenizer, StageData("pretrain", seq_len=64), root
    )
    assert not any(flag.startswith("noisy tail") for flag in clean.report["flags"])

    deduplicated = prepare(
        str(source), tokenizer, StageData("pretrain", seq_len=64), root, drop_duplicates=True, chunk_bytes=10_000
    )
    assert deduplicated.report["duplicates_dropped"] == report["duplicates"] and deduplicated.location != prepared.location
    unique = list({json.dumps(r): r for r in records}.values())
    expected = load_stage_dataset(write_jsonl(tmp_path / "unique.jsonl", unique), tokenizer, StageData("pretrain", seq_len=64))
    rows = PreparedRows(deduplicated.location)
    assert [rows[i] for i in range(len(rows))] == [expected[i] for i in range(len(expected))]  # the first of each stays, in order


def test_the_prepare_job_prepares_what_the_stage_job_then_finds(ray_cluster, demo, tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from minimind.demo import demo_tokenizer
    from minimind.driver.inputs import prepare_data
    from minimind.training.configs import PretrainConfig

    spec = importlib.util.spec_from_file_location("prepare_job", Path(__file__).resolve().parents[1] / "jobs" / "prepare.py")
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "prepare_job", job)  # dataclasses look their module up there
    spec.loader.exec_module(job)
    source = write_jsonl(tmp_path / "corpus.jsonl", pretrain_records(300))
    storage = str(tmp_path / "ray")
    with pytest.raises(SystemExit, match="--tokenizer"):  # real data never falls back to the demo tokenizer
        job.main(["--stage", "pretrain", "--data", str(source)])
    prepared = job.main(
        [
            "--stage",
            "pretrain",
            "--data",
            str(source),
            "--tokenizer",
            str(demo_tokenizer()),
            "--seq-len",
            "64",
            "--storage-path",
            storage,
        ]
    )
    assert not prepared.reused and prepared.location.startswith(f"{storage}/prepared/pretrain-64-")
    assert f"prepared data: {prepared.location}" in capsys.readouterr().out
    found = prepare_data(
        PretrainConfig(data=str(source), tokenizer=str(demo_tokenizer()), seq_len=64, storage_path=storage), "pretrain"
    )
    assert found.reused and found.location == prepared.location


@pytest.mark.parametrize("chunk_bytes", [1, 50, 100, 150, 180, 185, 186, 1000])
def test_chunks_start_at_line_starts_and_cover_the_file_whatever_the_cut(tmp_path, chunk_bytes):
    from minimind.data.prepare import chunk_bounds

    source = tmp_path / "two.jsonl"
    source.write_bytes(b'{"text": "' + b"a" * 80 + b'"}\n{"text": "' + b"b" * 90 + b'"}')  # 186 bytes, no final newline
    data = source.read_bytes()
    bounds = chunk_bounds(str(source), len(data), chunk_bytes)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(data)
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    assert all(start == 0 or data[start - 1 : start] == b"\n" for start, _ in bounds)
