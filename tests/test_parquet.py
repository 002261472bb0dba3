"""Stage data as Parquet (MiniMind-V's newest format): prepared with Ray Data into the shards JSONL gives,
the images' bytes inside them, decoded by the loader."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from minimind.data.parquet import is_parquet, prepare_any
from minimind.data.pixels import BatchWithPixels
from minimind.data.rows import DataFormatError, StageData, collate, iter_jsonl
from minimind.data.shards import PreparedRows


def parquet_of(jsonl: Path, images_dir: Path, destination: Path, json_strings: bool = True, limit: int | None = None) -> Path:
    """A MiniMind-V JSONL file as Parquet: `conversations` (JSON text, or a list of structs) and `image_bytes`
    (the bytes of each <image>'s file, in order)."""
    records = [record for _, record in iter_jsonl(jsonl, "vlm")][:limit]
    conversations = [json.dumps(r["conversations"], ensure_ascii=False) if json_strings else r["conversations"] for r in records]
    images = [[(images_dir / name).read_bytes() for name in r["images"]] for r in records]
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"conversations": conversations, "image_bytes": images, "source": ["demo"] * len(records)}),
                   destination)
    return destination


@pytest.fixture(scope="module")
def vlm_inputs(ray_cluster):
    from minimind.demo import demo_data, demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    paths = demo_data(0)
    return paths, load_tokenizer(demo_tokenizer())


def test_parquet_data_prepares_into_the_rows_its_jsonl_gives_with_the_images_bytes_inside(vlm_inputs, tmp_path):
    paths, tokenizer = vlm_inputs
    jsonl = tmp_path / "vlm_sft.jsonl"
    jsonl.write_text("".join(paths["vlm_sft"].read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    folder = tmp_path / "parquet"  # two files, conversations as lists of structs (the bad-row test: JSON text)
    parquet_of(jsonl, paths["images"], folder / "part-0.parquet", json_strings=False, limit=20)
    records = [line for line in jsonl.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "rest.jsonl").write_text("\n".join(records[20:]) + "\n", encoding="utf-8")
    parquet_of(tmp_path / "rest.jsonl", paths["images"], folder / "part-1.parquet", json_strings=False)
    assert is_parquet(str(folder)) and is_parquet("s3://bucket/vlm.parquet") and not is_parquet(str(jsonl))

    stage = StageData("vlm", seq_len=256, image_tokens=16)
    from_jsonl = PreparedRows(prepare_any(str(jsonl), tokenizer, stage, str(tmp_path / "prepared")).location)
    prepared = prepare_any(str(folder), tokenizer, stage, str(tmp_path / "prepared"))
    from_parquet = PreparedRows(prepared.location)
    assert prepared.manifest["records"] == 40 and len(from_parquet) == len(from_jsonl) > 0
    assert from_parquet.image_names() == set()  # no file to look for: the bytes are in the shards
    jsonl_rows = sorted((tuple(from_jsonl[i]["input_ids"]), tuple(from_jsonl[i]["labels"]), tuple(from_jsonl[i]["images"]))
                        for i in range(len(from_jsonl)))
    parquet_rows = [from_parquet[i] for i in range(len(from_parquet))]
    files = [tuple((paths["images"] / name).read_bytes() for name in images) for *_, images in jsonl_rows]
    assert sorted(files) == sorted(tuple(row["images"]) for row in parquet_rows)
    assert [row[:2] for row in jsonl_rows] == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in parquet_rows)

    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    by_ids = {tuple(from_jsonl[i]["input_ids"]): from_jsonl[i] for i in range(len(from_jsonl))}
    batch = [parquet_rows[0], parquet_rows[1]]
    decoded = BatchWithPixels(lambda rows: collate(rows, pad_id=0), processor, None)(batch)
    named = BatchWithPixels(lambda rows: collate(rows, pad_id=0), processor, paths["images"])(
        [by_ids[tuple(row["input_ids"])] for row in batch])
    assert torch.equal(decoded["pixel_values"], named["pixel_values"])  # the same pixels as from the files

    assert prepare_any(str(folder), tokenizer, stage, str(tmp_path / "prepared")).reused


def test_a_bad_parquet_row_names_its_file_or_is_skipped_and_counted(vlm_inputs, tmp_path):
    paths, tokenizer = vlm_inputs
    good = parquet_of(paths["vlm_sft"], paths["images"], tmp_path / "good.parquet", limit=3)
    table = pq.read_table(good)
    robot = json.dumps([{"role": "user", "content": "<image>\n看"}, {"role": "robot", "content": "?"}], ensure_ascii=False)
    rows = table.to_pylist() + [{"conversations": robot, "image_bytes": [b"\x89PNG"], "source": "x"},
                                {"conversations": table.to_pylist()[0]["conversations"], "image_bytes": [b"not an image"],
                                 "source": "y"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "bad.parquet")
    stage = StageData("vlm", seq_len=256, image_tokens=16)
    bad_row = r"bad.parquet: the row beginning .*(role 'robot'|not a readable image)"
    with pytest.raises(DataFormatError, match=bad_row):
        prepare_any(str(tmp_path / "bad.parquet"), tokenizer, stage, str(tmp_path / "prepared"))
    prepared = prepare_any(str(tmp_path / "bad.parquet"), tokenizer, stage, str(tmp_path / "prepared"), skip_bad=True)
    assert (prepared.manifest["records"], prepared.manifest["skipped_lines"]) == (3, 2)
