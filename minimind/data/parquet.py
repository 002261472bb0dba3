"""Stage data as Parquet, the way MiniMind-V's newest data ships: a `conversations` column (a JSON string,
or a list of {role, content}) and, for a VLM, an `image_bytes` column (one image's bytes, or a list of
them in the order of the text's <image> markers). Text stages take the same columns as the JSONL keys
(`text`, `conversations`, `chosen`, `rejected`); other columns are left out.

    prepared = prepare_parquet("s3://bucket/vlm_sft.parquet", tokenizer, StageData("vlm", image_tokens=196), root)

Ray Data reads the file (or folder of files) over the cluster; each write task validates, tokenizes and
writes one shard in the format JSONL preparation writes (minimind.data.shards), the images' bytes inside
it. The loader decodes them in its batches: no image is ever written as a file to one machine's disk. A
bad row (malformed conversation, unknown role, an image Pillow cannot read) stops the preparation naming
the file and the row's start; `skip_bad` skips and counts it. The folder is named after the content
digest of every file, so changed data is never matched with old shards.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time

import numpy as np
from PIL import Image
from ray.data import Datasink

from minimind import storage
from minimind.data.contamination import EvalSet, Overlap
from minimind.data.prepare import (
    BATCH_RECORDS,
    CHUNK_BYTES,
    SKIP_BAD_HINT,
    ChunkEncoder,
    Prepared,
    combine_blocks,
    content_sha256,
    count_duplicates,
    prepare,
    prepared_key,
    publish,
    read_manifest,
    record_contamination,
    record_hash,
    record_text,
    settings,
    tokenizer_digest,
    write_shard,
)
from minimind.data.report import ChunkStats
from minimind.data.rows import DataFormatError, StageData, is_blank, validate_record

IMAGE_BYTES = "image_bytes"
MESSAGE_LISTS = ("conversations", "chosen", "rejected")


def is_parquet(source: str) -> bool:
    """A .parquet file, or a folder holding some."""
    if source.endswith(".parquet"):
        return True
    return bool(_files(source)) if not storage.is_uri(source) and os.path.isdir(source) else False


def _files(source: str) -> list[tuple[str, int]]:
    """(path, size) of every Parquet file of `source`, in name order."""
    import pyarrow.fs

    filesystem, path = storage.filesystem_of(source)
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.File:
        return [(source, info.size)]
    if info.type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"no such data file or folder: {source}")
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return sorted((storage.join(source, f.path[len(path):].lstrip("/")), f.size) for f in found
                  if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet"))


def record_of(row: dict) -> tuple[dict, list[bytes]]:
    """A Parquet row as the JSONL record it stands for (images named "0", "1", ... in marker order) and its
    images' bytes."""
    record = {}
    for key in ("text", *MESSAGE_LISTS):
        value = row.get(key)
        record[key] = json.loads(value) if key in MESSAGE_LISTS and isinstance(value, str) else value
    images = row.get(IMAGE_BYTES)
    images = [] if images is None else [images] if isinstance(images, bytes) else list(images)
    if any(not isinstance(image, bytes) for image in images):
        raise ValueError(f'"{IMAGE_BYTES}" must hold bytes, or a list of bytes')
    record["image"] = ",".join(str(index) for index in range(len(images)))
    return {key: value for key, value in record.items() if value is not None}, images


def _check_image(data: bytes, index: int) -> None:
    """Pillow reads the image's header (the loader decodes it in full)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.size  # noqa: B018 - reading the header is the check
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds
        raise ValueError(f"image {index} is not a readable image ({type(error).__name__})") from None


def _where(row: dict, source: str) -> str:
    """A bad row, named by its file and the start of its first text (Ray Data does not number rows)."""
    first = row.get("text") or row.get("conversations") or row.get("chosen") or ""
    return f"{row.get('path') or source}: the row beginning {str(first)[:60]!r}"


class ShardSink(Datasink):
    """A Ray Data datasink: each write task turns the rows it gets into one shard."""

    def __init__(self, source: str, location: str, tokenizer, stage: StageData, marker_ids: dict, skip_bad: bool):
        super().__init__()
        self.source, self.location, self.skip_bad = source, location, skip_bad
        self.tokenizer, self.stage, self.marker_ids = tokenizer, stage, marker_ids
        self.summaries: list[dict] = []

    def write(self, blocks, ctx) -> dict:
        index = ctx.task_idx
        summary = {"index": index, "start": 0, "lines": 0, "error": None, "skipped": 0, "rows": 0, "tokens": 0,
                   "unlabelled": 0, "shard": f"shard-{index:05d}", "stats": ChunkStats(), "blocks": []}
        encoder = ChunkEncoder(self.tokenizer, self.stage, self.marker_ids, summary)
        blobs, hashes, batch = [], [], []
        for block in blocks:
            rows = block.to_pylist() if hasattr(block, "to_pylist") else block.to_dict("records")
            for position, row in enumerate(rows):
                summary["lines"] += 1
                try:
                    record, images = record_of(row)
                    record = validate_record(record, self.stage.kind)
                    for number, image in enumerate(images):
                        _check_image(image, number)
                except ValueError as error:  # json.JSONDecodeError is a ValueError
                    reason = f"{_where(row, self.source)}: {error}"
                    summary["skipped"] += 1
                    summary["error"] = summary["error"] or reason
                    if not self.skip_bad:
                        raise DataFormatError(f"{reason} ({SKIP_BAD_HINT})") from None
                    continue
                hashes.append(record_hash(record, self.stage.kind))
                if "images" in record:  # names: indices into this shard's images
                    record["images"] = [str(len(blobs) + int(name)) for name in record["images"]]
                    blobs += images
                text, empty = record_text(record, self.stage.kind)
                blank = is_blank(record, self.stage.kind)
                summary["stats"].add_record(text, position / max(len(rows), 1), empty=empty, blank=blank)
                if not blank:
                    batch.append(record)
                if len(batch) == BATCH_RECORDS:
                    encoder.add(batch)
                    batch = []
        if batch:
            encoder.add(batch)
        columns = encoder.columns()
        if blobs:
            columns["image_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            columns["image_offsets"] = np.concatenate([[0], np.cumsum([len(blob) for blob in blobs])]).astype(np.int64)
        write_shard(storage.join(self.location, summary["shard"]), columns)
        return {**summary, "hashes": np.asarray(hashes, dtype=np.uint64)}

    def on_write_complete(self, write_result) -> None:  # on the driver, once every task wrote
        self.summaries = sorted(write_result.write_returns, key=lambda summary: summary["index"])


def _data_format_error(error: BaseException) -> DataFormatError | None:
    """The write task's DataFormatError inside Ray's wrapping of it (whose message is the whole traceback)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        original = getattr(error, "cause", None)  # a RayTaskError's own exception
        if isinstance(original, DataFormatError):
            return DataFormatError(str(original))
        if type(error) is DataFormatError:
            return error
        error = original or error.__cause__
    return None


def prepare_parquet(source: str, tokenizer, stage: StageData, root: str, skip_bad: bool = False,
                    drop_duplicates: bool = False, copy_for_tasks=None, say=print) -> Prepared:
    """`prepare` for Parquet: the prepared folder of `source` for `stage` under `root`, found or made now."""
    import ray
    import ray.data

    if drop_duplicates:
        raise ValueError("--drop-duplicates works on JSONL data; Parquet data only counts its duplicates")
    started = time.perf_counter()
    source = source if storage.is_uri(source) else os.path.abspath(source)
    files = _files(source)
    if not files:
        raise FileNotFoundError(f"{source} holds no .parquet file")
    content = combine_blocks(bytes.fromhex(content_sha256(path, size)) for path, size in files)
    stage_settings, tokenizer_sha = settings(stage, False), tokenizer_digest(tokenizer)
    location = storage.join(root, prepared_key({"content_sha256": content}, tokenizer_sha, stage_settings))
    manifest = read_manifest(location)
    if manifest is not None:
        if manifest["skipped_lines"] and not skip_bad:
            raise DataFormatError(f"{manifest['first_bad_line']} (and {manifest['skipped_lines'] - 1} more; {SKIP_BAD_HINT})")
        say(f"[prepare] {source}: prepared already at {location} ({manifest['rows']:,} rows, {manifest['tokens']:,} tokens)")
        return Prepared(location, manifest, reused=True)
    if not ray.is_initialized():
        ray.init()
    read_from = copy_for_tasks() if copy_for_tasks is not None else source
    size = sum(size for _, size in files)
    say(f"[prepare] {source} ({size / 1e6:,.1f} MB, {len(files)} Parquet file(s)) -> {location}: Ray Data over the cluster")
    marker_ids = stage.marker_ids(tokenizer)
    sink = ShardSink(source, location, tokenizer, stage, marker_ids, skip_bad)
    try:
        ray.data.read_parquet(read_from, include_paths=True).write_datasink(sink)
    except Exception as error:
        bad_row = _data_format_error(error)
        if bad_row is None:
            raise
        raise bad_row from None
    encoded = sink.summaries
    first_bad = next((summary["error"] for summary in encoded if summary["error"]), None)
    identity = {"source": source, "content_sha256": content, "tokenizer_sha256": tokenizer_sha, "settings": stage_settings}
    return publish(location, identity, encoded, stage, tokenizer, marker_ids, first_bad, count_duplicates(encoded), False,
                   started, size, say)


def batch_overlap(batch, evaluation: EvalSet, kind: str) -> dict:
    """One Ray Data batch's records looked up in `evaluation`: its Overlap, pickled, as a one-row batch. A record
    is located by its file and the start of its text (Ray Data does not number rows); malformed rows are passed over."""
    found = Overlap()
    for row in batch.to_pylist():
        try:
            record = validate_record(record_of(row)[0], kind)
        except ValueError:
            continue
        found.add(evaluation, record_text(record, kind)[0], _where(row, ""))
    return {"overlap": [pickle.dumps(found)]}


def check_contamination_parquet(source: str, kind: str, evaluation: EvalSet, location: str, say=print) -> dict:
    """`minimind.data.prepare.check_contamination` for Parquet data: Ray Data reads the files over the cluster and
    each batch's records are looked up in `evaluation`; the batches' findings are merged here."""
    import ray

    parts = ray.data.read_parquet(source, include_paths=True).map_batches(
        batch_overlap, batch_format="pyarrow", fn_kwargs={"evaluation": evaluation, "kind": kind}).take_all()
    overlap = Overlap.merge([pickle.loads(part["overlap"]) for part in parts])
    return record_contamination(evaluation, overlap, source.rstrip("/").rsplit("/", 1)[-1], location, say)


def prepare_any(source: str, tokenizer, stage: StageData, root: str, chunk_bytes: int = CHUNK_BYTES, **options) -> Prepared:
    """`prepare_parquet` for Parquet data (a .parquet file or a folder of them), `prepare` for JSONL."""
    if is_parquet(source):
        return prepare_parquet(source, tokenizer, stage, root, **options)
    return prepare(source, tokenizer, stage, root, chunk_bytes=chunk_bytes, **options)
