"""Prepare a stage's JSONL once, over the Ray cluster's CPUs, into shards every node reads.

    prepared = prepare("s3://bucket/sft_mini_512.jsonl", tokenizer, StageData("sft", seq_len=512),
                       root="s3://bucket/minimind/prepared")
    rows = PreparedRows(storage.fetch(prepared.location))      # in a training worker

The source file is cut at line starts into chunks of `chunk_bytes`; Ray Data maps one task per chunk
(each reads only its byte range, from a local path or any storage URI): validate every line, tokenize,
label, weight, and write its shard next to the others. The driver only adds up what the tasks return
and writes the manifest and the data report, so its memory does not grow with the file.

Content-addressed: the folder is named after a digest of the source (size, modification time, its
first and last MiB), the tokenizer (vocabulary, merges, chat template, markers) and the settings that
change the rows (kind, seq_len, image tokens, duplicates dropped). The manifest is written last, so a
folder with one is complete and is reused as it is: the same inputs are never prepared twice.

Errors name the file and line as `iter_jsonl` does: a task stops at its first bad line and reports it
with its line number inside the chunk; the driver turns that into the file's line number from the line
counts of the chunks before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass

import numpy as np

from minimind import data_report, storage
from minimind.data import DataFormatError, StageData, stage_arrays, validate_record
from minimind.shards import FORMAT_VERSION, MANIFEST, pack_rows, token_dtype, write_array, write_text

CHUNK_BYTES = 32 << 20  # one task's share of the file: bounds a task's memory, gives the cluster enough tasks
BATCH_RECORDS = 512  # records tokenized per call inside a task
_SAMPLE = 1 << 20


@dataclass
class Prepared:
    location: str  # the folder (a path or storage URI) holding manifest + shards
    manifest: dict
    reused: bool  # found complete: nothing was prepared this time
    seconds: float = 0.0

    @property
    def report(self) -> dict:
        return self.manifest["report"]


# --------------------------------------------------------------------------- what makes a preparation


def source_fingerprint(source: str) -> dict:
    """What identifies the source's content without reading it all: size, modification time and a
    digest of its first and last MiB (a URI's bytes are read as ranges)."""
    import pyarrow.fs

    filesystem, path = storage.filesystem_of(source)
    info = filesystem.get_file_info(path)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"no such data file: {source}")
    digest = hashlib.sha256()
    with filesystem.open_input_file(path) as file:
        digest.update(file.read_at(min(_SAMPLE, info.size), 0))
        digest.update(file.read_at(min(_SAMPLE, info.size), max(0, info.size - _SAMPLE)))
    return {"size": info.size, "mtime_ns": info.mtime_ns, "sample_sha256": digest.hexdigest()}


def tokenizer_digest(tokenizer) -> str:
    from minimind.tokenizer import Markers

    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.pad_token_id, tokenizer.bos_token,
                              tokenizer.eos_token, asdict(Markers.of(tokenizer))], sort_keys=True).encode())
    return digest.hexdigest()


def settings(stage: StageData, drop_duplicates: bool) -> dict:
    """What changes the rows (a reasoning stage's tag weight does not: it is applied when reading)."""
    return {"format": FORMAT_VERSION, "kind": stage.kind, "seq_len": stage.seq_len, "drop_duplicates": drop_duplicates,
            **({"image_tokens": stage.image_tokens} if stage.kind == "vlm" else {})}


def prepared_key(fingerprint: dict, tokenizer_sha: str, stage_settings: dict) -> str:
    text = json.dumps({"source": fingerprint, "tokenizer": tokenizer_sha, "settings": stage_settings}, sort_keys=True)
    return f"{stage_settings['kind']}-{stage_settings['seq_len']}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def read_manifest(location: str) -> dict | None:
    import pyarrow.fs

    filesystem, path = storage.filesystem_of(storage.join(location, MANIFEST))
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as file:
        return json.loads(file.read())


# --------------------------------------------------------------------------- the driver


def prepared_location(source: str, tokenizer, stage: StageData, root: str, drop_duplicates: bool = False) -> tuple[str, dict | None]:
    """Where the prepared data of `source` lives under `root`, and its manifest if it is complete."""
    source = source if storage.is_uri(source) else os.path.abspath(source)
    key = prepared_key(source_fingerprint(source), tokenizer_digest(tokenizer), settings(stage, drop_duplicates))
    location = storage.join(root, key)
    return location, read_manifest(location)


def prepare(source: str, tokenizer, stage: StageData, root: str, skip_bad: bool = False, drop_duplicates: bool = False,
            chunk_bytes: int = CHUNK_BYTES, read_from: str | None = None, say=print) -> Prepared:
    """The prepared folder of `source` for `stage` under `root`: found, or made now with Ray Data (Ray
    is started here if no one did). Bad lines raise `DataFormatError` naming file and line, unless
    `skip_bad` (then they are counted in the manifest). `read_from`: a copy of `source` the Ray tasks
    read instead (on storage, when `source` is on the driver's disk only)."""
    started = time.perf_counter()
    source = source if storage.is_uri(source) else os.path.abspath(source)
    fingerprint = source_fingerprint(source)
    stage_settings = settings(stage, drop_duplicates)
    tokenizer_sha = tokenizer_digest(tokenizer)
    location = storage.join(root, prepared_key(fingerprint, tokenizer_sha, stage_settings))
    manifest = read_manifest(location)
    if manifest is not None:
        if manifest["skipped_lines"] and not skip_bad:
            raise DataFormatError(f"{manifest['first_bad_line']} (and {manifest['skipped_lines'] - 1} more; --skip-bad skips them)")
        say(f"[prepare] {source}: prepared already at {location} ({manifest['rows']:,} rows, {manifest['tokens']:,} tokens)")
        return Prepared(location, manifest, reused=True)

    chunks = chunk_bounds(read_from or source, fingerprint["size"], chunk_bytes)
    say(f"[prepare] {source} ({fingerprint['size'] / 1e6:,.1f} MB) -> {location}: {len(chunks)} chunk(s) over the Ray cluster")
    common = {"source": read_from or source, "kind": stage.kind, "size": fingerprint["size"]}
    specs = [{"index": i, "start": start, "end": end, **common} for i, (start, end) in enumerate(chunks)]
    drops: dict[int, np.ndarray] = {}
    if drop_duplicates:
        hashed = _run(specs, {"mode": "hash", "skip_bad": skip_bad})
        _raise_first_error(source, hashed, skip_bad)
        drops = _duplicates_to_drop(hashed)
    marker_ids = stage.marker_ids(tokenizer)
    encoded = _run([{**spec, "drop": drops.get(spec["index"], np.zeros(0, np.int64)).tolist()} for spec in specs], {
        "mode": "encode", "skip_bad": skip_bad, "tokenizer": tokenizer, "stage": stage, "marker_ids": marker_ids, "output": location})
    first_bad = _raise_first_error(source, encoded, skip_bad)

    duplicates = _count_duplicates(encoded) if not drop_duplicates else sum(len(d) for d in drops.values())
    stats = data_report.merge([summary["stats"] for summary in encoded])
    shards = [{"name": s["shard"], "rows": s["rows"], "tokens": s["tokens"]} for s in encoded]
    tokens = sum(shard["tokens"] for shard in shards)
    rows = math.ceil(tokens / stage.seq_len) if stage.kind == "pretrain" else sum(shard["rows"] for shard in shards)
    stats.rows = rows
    skipped = sum(s["skipped"] for s in encoded)
    report = data_report.finish(stats, duplicates=duplicates, duplicates_dropped=duplicates if drop_duplicates else 0,
                                skipped_lines=skipped, unlabelled_dropped=sum(s["unlabelled"] for s in encoded))
    manifest = {
        "format": FORMAT_VERSION, "kind": stage.kind, "seq_len": stage.seq_len, "source": source, "source_fingerprint": fingerprint,
        "tokenizer_sha256": tokenizer_sha, "settings": stage_settings, "key": location.rstrip("/").rsplit("/", 1)[-1],
        "dtype": np.dtype(token_dtype(len(tokenizer))).name, "pad_id": tokenizer.pad_token_id, "tag_sequences": marker_ids["tag_sequences"],
        "rows": rows, "tokens": tokens, "records": stats.records, "lines": sum(s["lines"] for s in encoded),
        "skipped_lines": skipped, "first_bad_line": first_bad, "duplicates_dropped": report["duplicates_dropped"],
        "length_histogram": report["length_histogram"], "shards": shards, "report": report,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    filesystem, folder = storage.filesystem_of(location)
    write_text(filesystem, f"{folder}/report.json", json.dumps(report, indent=1, ensure_ascii=False))
    _write_plot(filesystem, folder, report)
    _publish(filesystem, f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1, ensure_ascii=False))  # last: marks it complete
    seconds = time.perf_counter() - started
    say(f"[prepare] {rows:,} rows, {tokens:,} tokens from {stats.records:,} records in {seconds:.1f}s "
        f"({fingerprint['size'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)" + "".join(f"\n[prepare] flag: {flag}" for flag in report["flags"]))
    return Prepared(location, manifest, reused=False, seconds=seconds)


def _run(specs: list[dict], settings_: dict) -> list[dict]:
    """One Ray Data task per chunk; their summaries in chunk order."""
    import ray

    if not ray.is_initialized():
        ray.init()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # our own line per preparation says enough
    dataset = ray.data.from_items(specs, override_num_blocks=len(specs))
    done = dataset.map(_chunk_task, fn_kwargs={"settings": settings_}, num_cpus=1).take_all()
    return sorted((pickle.loads(row["summary"]) for row in done), key=lambda summary: summary["index"])


def _chunk_task(spec: dict, settings: dict) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task: Ray runs the tasks side by side
    summary = process_chunk(spec, **settings)
    return {"summary": pickle.dumps(summary)}


def _raise_first_error(source: str, summaries: list[dict], skip_bad: bool) -> str | None:
    """The first bad line of the file as `file:line: reason`: raised unless `skip_bad`, else returned."""
    line_before = 0
    for summary in summaries:
        if summary["error"]:
            local_line, reason = summary["error"]
            message = f"{source}:{line_before + local_line}: {reason}"
            if not skip_bad:
                raise DataFormatError(message)
            return message
        line_before += summary["lines"]
    return None


def _duplicates_to_drop(summaries: list[dict]) -> dict[int, np.ndarray]:
    """Per chunk, the record indices that repeat an earlier record of the file (the first one stays)."""
    hashes = np.concatenate([s["hashes"] for s in summaries]) if summaries else np.zeros(0, np.uint64)
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[first] = True
    drops, offset = {}, 0
    for summary in summaries:
        count = len(summary["hashes"])
        drops[summary["index"]] = np.flatnonzero(~keep[offset : offset + count])
        offset += count
    return drops


def _count_duplicates(summaries: list[dict]) -> int:
    hashes = np.concatenate([s["hashes"] for s in summaries]) if summaries else np.zeros(0, np.uint64)
    return int(len(hashes) - len(np.unique(hashes)))


def _publish(filesystem, path: str, text: str) -> None:
    """Write a file readers never see half-written: renamed into place on a local disk (an object
    store's PUT is atomic already)."""
    import pyarrow.fs

    if not isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return write_text(filesystem, path, text)
    partial = f"{path}.partial-{os.getpid()}"
    write_text(filesystem, partial, text)
    filesystem.move(partial, path)


def _write_plot(filesystem, folder: str, report: dict) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        data_report.write_plot(report, f"{scratch}/report.png")
        with open(f"{scratch}/report.png", "rb") as file, filesystem.open_output_stream(f"{folder}/report.png") as out:
            out.write(file.read())


def chunk_bounds(source: str, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes`, each starting at a line start (found by reading a little past
    each nominal cut); a cut inside the last line ends the list there."""
    filesystem, path = storage.filesystem_of(source)
    starts = [0]
    with filesystem.open_input_file(path) as file:
        for nominal in range(chunk_bytes, size, chunk_bytes):
            cursor, line_start = max(nominal, starts[-1] + 1) - 1, None
            while cursor < size:  # the first newline at or after the byte before the cut
                window = file.read_at(min(1 << 16, size - cursor), cursor)
                newline = window.find(b"\n")
                if newline >= 0:
                    line_start = cursor + newline + 1
                    break
                cursor += len(window)
            if line_start is None or line_start >= size:
                break
            starts.append(line_start)
    return list(zip(starts, [*starts[1:], size]))


# --------------------------------------------------------------------------- one chunk, in a Ray task


def _read_range(source: str, start: int, end: int) -> bytes:
    filesystem, path = storage.filesystem_of(source)
    with filesystem.open_input_file(path) as file:
        return file.read_at(end - start, start)


def _record_text(record: dict, kind: str) -> tuple[str, bool]:
    """All the text of a record (for the garbage checks) and whether a reply in it is blank."""
    if kind == "pretrain":
        return record["text"], False
    messages = record["chosen"] + record["rejected"] if kind == "dpo" else record["conversations"]
    return "\n".join(m["content"] for m in messages), any(m["role"] == "assistant" and not m["content"].strip() for m in messages)


def _record_hash(record: dict) -> int:
    """Of the fields the stage uses, as parsed: the same record counts as a duplicate whatever its spacing or key order."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def process_chunk(spec: dict, mode: str, skip_bad: bool, tokenizer=None, stage: StageData | None = None, marker_ids=None,
                  output: str | None = None) -> dict:
    """Validate (and in "encode" mode, tokenize and write) the lines of one byte range of the source.
    Records are encoded BATCH_RECORDS at a time and kept only as arrays: a task's memory is its chunk's
    bytes and tokens, whatever the file's size."""
    raw = _read_range(spec["source"], spec["start"], spec["end"])
    lines = raw.split(b"\n")
    del raw
    if lines and lines[-1] == b"":
        lines.pop()
    summary = {"index": spec["index"], "lines": len(lines), "error": None, "skipped": 0, "rows": 0, "tokens": 0, "unlabelled": 0,
               "shard": f"shard-{spec['index']:05d}", "stats": data_report.ChunkStats()}
    hashes, batch, position, dropped = [], [], spec["start"], set(spec.get("drop", []))
    encoder = _ChunkEncoder(tokenizer, stage, marker_ids, summary) if mode == "encode" else None
    for number, line in enumerate(lines, start=1):
        line_start, position = position, position + len(line) + 1
        try:
            text = line.decode("utf-8-sig" if spec["start"] == 0 and number == 1 else "utf-8")
            if not text.strip():
                continue
            record = validate_record(json.loads(text), spec["kind"])
        except UnicodeDecodeError as error:
            reason = f"not valid UTF-8 (byte {error.start + 1} of the line: {line[error.start:error.start + 4]!r})"
        except (json.JSONDecodeError, ValueError) as error:
            reason = str(error)
        else:
            hashes.append(_record_hash(record))
            if encoder is None or len(hashes) - 1 in dropped:
                continue
            recorded_text, empty = _record_text(record, spec["kind"])
            summary["stats"].add_record(recorded_text, line_start / max(1, spec["size"]), empty=empty)
            batch.append(record)
            if len(batch) == BATCH_RECORDS:
                encoder.add(batch)
                batch = []
            continue
        summary["skipped"] += 1
        summary["error"] = summary["error"] or (number, reason)
        if not skip_bad:
            return {**summary, "hashes": np.zeros(0, np.uint64)}
    summary["hashes"] = np.asarray(hashes, dtype=np.uint64)
    if encoder is None:
        return summary
    del lines
    if batch:
        encoder.add(batch)
    filesystem, folder = storage.filesystem_of(storage.join(output, summary["shard"]))
    filesystem.create_dir(folder, recursive=True)
    for name, array in encoder.columns().items():
        if name == "images":
            write_text(filesystem, f"{folder}/images.json", json.dumps(array, ensure_ascii=False))
        else:
            write_array(filesystem, f"{folder}/{name}.npy", array)
    _release_freed_memory()
    return summary


def _release_freed_memory() -> None:
    """Hand the heap this task freed back to the OS (glibc keeps it otherwise, and a worker process that
    runs task after task would hold its largest chunk's worth for good)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _ChunkEncoder:
    """Batches of validated records -> a shard's columns, counting rows, tokens and the report's figures."""

    def __init__(self, tokenizer, stage: StageData, marker_ids: dict, summary: dict):
        self.tokenizer, self.stage, self.marker_ids, self.summary = tokenizer, stage, marker_ids, summary
        self.stats = summary["stats"]
        self.dtype = token_dtype(len(tokenizer))
        self.sides = ("chosen_", "rejected_") if stage.kind == "dpo" else ("",)
        self.pieces: dict[str, list] = {}

    def add(self, records: list[dict]) -> None:
        if self.stage.kind == "pretrain":
            bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
            encodings = self.tokenizer.backend_tokenizer.encode_batch([bos + r["text"] + eos for r in records], add_special_tokens=False)
            ids = [np.asarray(encoding.ids, dtype=self.dtype) for encoding in encodings]
            self.pieces.setdefault("input_ids", []).extend(ids)
            self.stats.add_lengths([len(x) for x in ids])
            self.stats.add_tokens("text", sum(len(x) for x in ids))
            return
        rows = stage_arrays(records, self.stage, self.tokenizer, self.marker_ids)
        kept = [row for row in rows if all(row[side + "supervised"].any() for side in self.sides)]  # a cut can remove every supervised token
        self.summary["unlabelled"] += len(rows) - len(kept)
        for side in self.sides:
            for name, array in pack_rows(kept, side, self.dtype).items():
                self.pieces.setdefault(name, []).append(array)
            supervised = int(sum(row[side + "supervised"].sum() for row in kept))
            total = sum(len(row[side + "input_ids"]) for row in kept)
            self.stats.add_tokens(side + "reply" if side else "reply", supervised)
            self.stats.add_tokens(side + "prompt" if side else "prompt", total - supervised)
        self.pieces.setdefault("truncated", []).append(np.asarray([row["truncated"] for row in kept], dtype=np.uint8))
        if self.stage.kind == "vlm":
            self.pieces.setdefault("images", []).extend(row["images"] for row in kept)
        self.stats.add_lengths([max(len(row[side + "input_ids"]) for side in self.sides) for row in kept])
        self.stats.truncated += sum(row["truncated"] for row in kept)
        self.summary["rows"] += len(kept)

    def columns(self) -> dict:
        columns = {}
        for name, parts in self.pieces.items():
            if name == "images":
                columns[name] = parts
            elif name.endswith("offsets"):
                columns[name] = _join_offsets(parts)
            elif name.endswith("mask"):
                columns[name] = np.packbits(np.concatenate(parts))  # one bit per token
            else:
                columns[name] = np.concatenate(parts)
        if self.stage.kind == "pretrain":
            columns.setdefault("input_ids", np.zeros(0, self.dtype))
            self.summary["tokens"] = len(columns["input_ids"])
        else:
            for side in self.sides:
                if side + "offsets" not in columns:  # no row in this chunk
                    columns.update({side + "input_ids": np.zeros(0, self.dtype), side + "offsets": np.zeros(1, np.int64),
                                    side + "mask": np.zeros(0, np.uint8)})
            columns.setdefault("truncated", np.zeros(0, np.uint8))
            self.summary["tokens"] = int(sum(len(columns[side + "input_ids"]) for side in self.sides))
        self.stats.tokens += self.summary["tokens"]
        return columns


def _join_offsets(parts: list[np.ndarray]) -> np.ndarray:
    joined, base = [np.zeros(1, np.int64)], 0
    for offsets in parts:
        joined.append(offsets[1:] + base)
        base += int(offsets[-1])
    return np.concatenate(joined)
