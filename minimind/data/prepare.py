"""Prepare a stage's JSONL once, over the Ray cluster's CPUs, into shards every node reads.

    prepared = prepare("s3://bucket/sft_mini_512.jsonl", tokenizer, StageData("sft", seq_len=512),
                       root="s3://bucket/minimind/prepared")
    rows = PreparedRows(storage.fetch(prepared.location))      # in a training worker

The source file is cut at line starts into chunks of `chunk_bytes`; one Ray task per chunk (each reads
only its byte range, from a local path or any storage URI): validate every line, tokenize, label,
weight, and write its shard next to the others. The driver only adds up what the tasks return and
writes the manifest and the data report, so its memory does not grow with the file. Long work shows
its progress (chunks done, MB/s, ETA).

Never reused for other content: the manifest records the sha256 of the whole source (one digest per
MiB block, combined in order; the tasks hash the blocks they read). The folder is named after a cheap
fingerprint of the source (size, modification time, its first and last MiB), the tokenizer
(vocabulary, merges, chat template, markers) and the settings that change the rows (kind, seq_len,
image tokens, duplicates dropped): the fingerprint only says whether a folder is worth checking. A
folder is reused only when the file, hashed again in full now, has the manifest's digest; a file with
the same fingerprint and other content (one digit edited, mtime restored by `cp -p`, `rsync -a` or
`tar x`) is prepared into a folder named after its digest. The manifest is written last, so a folder
with one is complete.

Errors name the file and line as `iter_jsonl` does: a task stops at its first malformed line (not
JSON, a wrong type, a missing key) and the driver stops the whole preparation as soon as one arrives,
cancelling the other tasks, and names the file's line (`--skip-bad` skips and counts such lines
instead). A pretraining record whose text is empty or blank is no error: it is left out and counted
in the data report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain

import numpy as np

from minimind import storage
from minimind.data import report as data_report
from minimind.data.contamination import EvalSet, N, Overlap, contamination_report
from minimind.data.rows import DataFormatError, StageData, is_blank, stage_arrays, validate_record
from minimind.data.shards import FORMAT_VERSION, MANIFEST, pack_rows, token_dtype, write_array, write_text
from minimind.model.tokenizer import Markers

CHUNK_BYTES = 32 << 20  # one task's share of the file: bounds a task's memory, gives the cluster enough tasks
BATCH_RECORDS = 512  # records tokenized per call inside a task
_SAMPLE = 1 << 20
BLOCK_BYTES = 1 << 20  # the content digest hashes the file in blocks of this size, whatever the chunks
SKIP_BAD_HINT = "--skip-bad skips and counts such lines"


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


def block_count(size: int) -> int:
    return -(-size // BLOCK_BYTES)


def combine_blocks(digests) -> str:
    """The content digest: sha256 over the blocks' sha256 digests, in file order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def content_sha256(source: str, size: int) -> str:
    """The digest of the whole content of `source` (`size` bytes), as the chunk tasks compute it,
    hashed here on a thread per core (reads and hashing release the GIL)."""
    filesystem, path = storage.filesystem_of(source)
    per_job = 64  # blocks per thread job

    def hash_blocks(first: int) -> list[bytes]:
        with filesystem.open_input_file(path) as file:
            return [hashlib.sha256(file.read_at(min(BLOCK_BYTES, size - block * BLOCK_BYTES), block * BLOCK_BYTES)).digest()
                    for block in range(first, min(first + per_job, block_count(size)))]

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return combine_blocks(chain.from_iterable(pool.map(hash_blocks, range(0, block_count(size), per_job))))


def tokenizer_digest(tokenizer) -> str:
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.pad_token_id, tokenizer.bos_token,
                              tokenizer.eos_token, asdict(Markers.of(tokenizer))], sort_keys=True).encode())
    return digest.hexdigest()


def settings(stage: StageData, drop_duplicates: bool) -> dict:
    """What changes the rows (a reasoning stage's tag weight does not: it is applied when reading)."""
    return {"format": FORMAT_VERSION, "kind": stage.kind, "seq_len": stage.seq_len, "drop_duplicates": drop_duplicates,
            **({"image_tokens": stage.image_tokens} if stage.kind == "vlm" else {})}


def prepared_key(source_identity: dict, tokenizer_sha: str, stage_settings: dict) -> str:
    """The folder name: `source_identity` is the source's cheap fingerprint, or {"content_sha256": ...}
    for content whose fingerprint names a folder of other content."""
    text = json.dumps({"source": source_identity, "tokenizer": tokenizer_sha, "settings": stage_settings}, sort_keys=True)
    return f"{stage_settings['kind']}-{stage_settings['seq_len']}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def read_manifest(location: str) -> dict | None:
    import pyarrow.fs

    filesystem, path = storage.filesystem_of(storage.join(location, MANIFEST))
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as file:
        return json.loads(file.read())


# --------------------------------------------------------------------------- the driver


@dataclass
class Found:
    location: str  # where the source's prepared data is, or goes
    manifest: dict | None  # the complete preparation there, of exactly this content; None: prepare it
    content_sha256: str | None  # the source's whole-content digest, when it was hashed (a folder was worth checking)


def find_prepared(source: str, fingerprint: dict, tokenizer_sha: str, stage_settings: dict, root: str) -> Found:
    """The folder for `source` under `root`. No complete folder for its fingerprint: nothing to check
    (the preparation hashes the content as it reads it). Else the file is hashed in full, and the folder
    is reused only for the content its manifest recorded; other content goes to a folder named after it."""
    location = storage.join(root, prepared_key(fingerprint, tokenizer_sha, stage_settings))
    manifest = read_manifest(location)
    if manifest is None:
        return Found(location, None, None)
    content = content_sha256(source, fingerprint["size"])
    if manifest.get("content_sha256") == content:
        return Found(location, manifest, content)
    location = storage.join(root, prepared_key({"content_sha256": content}, tokenizer_sha, stage_settings))
    manifest = read_manifest(location)
    return Found(location, manifest if manifest and manifest.get("content_sha256") == content else None, content)


def prepared_location(
    source: str, tokenizer, stage: StageData, root: str, drop_duplicates: bool = False
) -> tuple[str, dict | None]:
    """Where the prepared data of `source` lives under `root`, and its manifest if it is complete
    (for this very content: the file is hashed when a folder is worth checking)."""
    source = source if storage.is_uri(source) else os.path.abspath(source)
    found = find_prepared(source, source_fingerprint(source), tokenizer_digest(tokenizer), settings(stage, drop_duplicates), root)
    return found.location, found.manifest


def prepare(
    source: str,
    tokenizer,
    stage: StageData,
    root: str,
    skip_bad: bool = False,
    drop_duplicates: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    read_from: str | None = None,
    copy_for_tasks=None,
    say=print,
) -> Prepared:
    """The prepared folder of `source` for `stage` under `root`: found, or made now with Ray tasks (Ray
    is started here if no one did). A malformed line stops it at once with `DataFormatError` naming
    file and line, unless `skip_bad` (then such lines are counted in the manifest). `read_from`: a copy
    of `source` the Ray tasks read instead (on storage, when `source` is on the driver's disk only);
    `copy_for_tasks`, a function that makes such a copy and returns it, called only when there is work."""
    started = time.perf_counter()
    source = source if storage.is_uri(source) else os.path.abspath(source)
    fingerprint = source_fingerprint(source)
    stage_settings = settings(stage, drop_duplicates)
    tokenizer_sha = tokenizer_digest(tokenizer)
    found = find_prepared(source, fingerprint, tokenizer_sha, stage_settings, root)
    location, manifest = found.location, found.manifest
    if manifest is not None:
        if manifest["skipped_lines"] and not skip_bad:
            raise DataFormatError(f"{manifest['first_bad_line']} (and {manifest['skipped_lines'] - 1} more; {SKIP_BAD_HINT})")
        say(f"[prepare] {source}: prepared already at {location} ({manifest['rows']:,} rows, {manifest['tokens']:,} tokens)")
        return Prepared(location, manifest, reused=True)
    if found.content_sha256:
        say(
            f"[prepare] {source}: the folder for its size, time and first and last MiB holds other content (or a preparation "
            "without a content digest): this content gets a folder of its own"
        )

    if copy_for_tasks is not None:
        read_from = copy_for_tasks()
    size = fingerprint["size"]
    chunks = chunk_bounds(read_from or source, size, chunk_bytes)
    say(f"[prepare] {source} ({size / 1e6:,.1f} MB) -> {location}: {len(chunks)} chunk(s) over the Ray cluster")
    common = {"source": read_from or source, "kind": stage.kind, "size": size}
    specs = [{"index": i, "start": start, "end": end, **common} for i, (start, end) in enumerate(chunks)]
    drops: dict[int, np.ndarray] = {}
    if drop_duplicates:
        hashed = _run(source, specs, {"mode": "hash", "skip_bad": skip_bad}, "finding duplicates")
        drops = _duplicates_to_drop(hashed)
    marker_ids = stage.marker_ids(tokenizer)
    encoded = _run(
        source,
        [{**spec, "drop": drops.get(spec["index"], np.zeros(0, np.int64)).tolist()} for spec in specs],
        {
            "mode": "encode",
            "skip_bad": skip_bad,
            "tokenizer": tokenizer,
            "stage": stage,
            "marker_ids": marker_ids,
            "output": location,
        },
        "preparing",
    )
    first_bad = first_error(source, encoded)
    blocks = [digest for summary in encoded for digest in summary["blocks"]]
    content = combine_blocks(blocks)
    if len(blocks) != block_count(size) or found.content_sha256 not in (None, content):
        raise RuntimeError(f"{source} changed while it was being prepared: prepare it again")
    duplicates = count_duplicates(encoded) if not drop_duplicates else sum(len(d) for d in drops.values())
    identity = {"source": source, "source_fingerprint": fingerprint, "content_sha256": content, "tokenizer_sha256": tokenizer_sha,
                "settings": stage_settings}
    return publish(location, identity, encoded, stage, tokenizer, marker_ids, first_bad, duplicates, drop_duplicates,
                   started, size, say)


def publish(location: str, identity: dict, encoded: list[dict], stage: StageData, tokenizer, marker_ids: dict,
            first_bad: str | None, duplicates: int, drop_duplicates: bool, started: float, size: int, say=print) -> Prepared:
    """The manifest and data report of shards written by tasks (their summaries `encoded`, in order),
    the manifest last: from then on the folder counts as complete. `identity`: what the source was."""
    stats = data_report.merge([summary["stats"] for summary in encoded])
    shards = [{"name": s["shard"], "rows": s["rows"], "tokens": s["tokens"]} for s in encoded]
    tokens = sum(shard["tokens"] for shard in shards)
    rows = math.ceil(tokens / stage.seq_len) if stage.kind == "pretrain" else sum(shard["rows"] for shard in shards)
    stats.rows = rows
    skipped = sum(s["skipped"] for s in encoded)
    report = data_report.finish(
        stats,
        duplicates=duplicates,
        duplicates_dropped=duplicates if drop_duplicates else 0,
        skipped_lines=skipped,
        unlabelled_dropped=sum(s["unlabelled"] for s in encoded),
    )
    manifest = {
        "format": FORMAT_VERSION,
        "kind": stage.kind,
        "seq_len": stage.seq_len,
        **identity,
        "key": location.rstrip("/").rsplit("/", 1)[-1],
        "dtype": np.dtype(token_dtype(len(tokenizer))).name,
        "pad_id": tokenizer.pad_token_id,
        "tag_sequences": marker_ids["tag_sequences"],
        "rows": rows,
        "tokens": tokens,
        "records": stats.records,
        "lines": sum(s["lines"] for s in encoded),
        "skipped_lines": skipped,
        "first_bad_line": first_bad,
        "duplicates_dropped": report["duplicates_dropped"],
        "length_histogram": report["length_histogram"],
        "shards": shards,
        "report": report,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    filesystem, folder = storage.filesystem_of(location)
    write_text(filesystem, f"{folder}/report.json", json.dumps(report, indent=1, ensure_ascii=False))
    _write_plot(filesystem, folder, report)
    _publish(filesystem, f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1, ensure_ascii=False))  # last: marks it complete
    seconds = time.perf_counter() - started
    say(
        f"[prepare] {rows:,} rows, {tokens:,} tokens from {stats.records:,} records in {seconds:.1f}s "
        f"({size / 1e6 / max(seconds, 1e-9):.1f} MB/s)" + "".join(f"\n[prepare] flag: {flag}" for flag in report["flags"])
    )
    return Prepared(location, manifest, reused=False, seconds=seconds)


def check_contamination(source: str, kind: str, evaluation: EvalSet, location: str, chunk_bytes: int = CHUNK_BYTES,
                        read_from: str | None = None, say=print) -> dict:
    """Which documents of `evaluation` share a 13-gram with `source`'s records (`minimind.data.contamination`),
    over the Ray cluster: one task per chunk, as preparation's, `evaluation` sent to each once. The report goes to
    `location`/contamination.json (the prepared folder) and is returned; each worst example names its file line."""
    source = source if storage.is_uri(source) else os.path.abspath(source)
    size = source_fingerprint(source)["size"]
    chunks = chunk_bounds(read_from or source, size, chunk_bytes)
    specs = [{"index": i, "start": start, "end": end, "source": read_from or source, "kind": kind, "size": size}
             for i, (start, end) in enumerate(chunks)]
    # bad lines were stopped or counted when the data was prepared: here they are only passed over
    parts = _run(source, specs, {"mode": "contamination", "skip_bad": True, "evaluation": evaluation},
                 f"checking {len(evaluation.doc_text):,} evaluation documents for {N}-grams of the data")
    lines_before = np.cumsum([0] + [part["lines"] for part in parts])
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return record_contamination(evaluation, Overlap.merge([part["overlap"] for part in parts]), name, location, say,
                                where=lambda found: f"{name}:{lines_before[found[0]] + found[1]}")


def record_contamination(evaluation: EvalSet, overlap: Overlap, name: str, location: str, say=print, where=str) -> dict:
    """The contamination report of `overlap`, written to `location`/contamination.json and said task by task."""
    report = contamination_report(evaluation, overlap, where=where)
    filesystem, folder = storage.filesystem_of(location)
    write_text(filesystem, f"{folder}/contamination.json", json.dumps(report, indent=1, ensure_ascii=False))
    for task, figures in report["tasks"].items():
        say(f"[prepare] {task}: {figures['dirty']} of {figures['checked']} checked documents share a {N}-gram with "
            f"{name} ({figures['dirty_rate']:.1%}; {figures['too_short']} too short to check)")
    for flag in report["flags"]:
        say(f"[prepare] flag: {flag}")
    return report


def _run(source: str, specs: list[dict], task_settings: dict, doing: str) -> list[dict]:
    """One Ray task per chunk; their summaries in chunk order. Without `skip_bad`, the first bad line
    to arrive stops everything: the other tasks are cancelled and `DataFormatError` names the line."""
    import ray

    if not ray.is_initialized():
        ray.init()
    # "DEFAULT" scheduling: the tasks use the cluster's CPUs, never the caller's placement group (a Tune
    # trial's holds half a CPU, which a one-CPU task cannot fit in), as Ray Data's tasks did
    chunk_task = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(_chunk_task)
    shared = ray.put(task_settings)  # the tokenizer once, not once per task
    pending = {chunk_task.remote(spec, shared): spec for spec in specs}
    progress = Progress(f"[prepare] {doing}", sum(spec["end"] - spec["start"] for spec in specs), len(specs))
    summaries = gather(pending, stop_at_error=not task_settings["skip_bad"], progress=progress)
    error = first_error(source, summaries)
    if error and not task_settings["skip_bad"]:
        raise DataFormatError(f"{error} ({SKIP_BAD_HINT})")
    return summaries


def _chunk_task(spec: dict, task_settings: dict) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task: Ray runs the tasks side by side
    return process_chunk(spec, **task_settings)


def gather(pending: dict, stop_at_error: bool, progress: "Progress | None" = None) -> list[dict]:
    """The summaries of chunk tasks (a dict: Ray ObjectRef -> its chunk's spec), taken as they finish,
    returned in chunk order. With `stop_at_error`, the first summary with a bad line ends it at once:
    the tasks still running or waiting are cancelled, and the summaries finished by then are returned."""
    import ray

    pending, done = dict(pending), []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            if len(pending) > 1:  # others that finished meanwhile: the earliest bad line among them is reported
                ready += ray.wait([ref for ref in pending if ref not in ready], num_returns=len(pending) - 1, timeout=0)[0]
            for ref in ready:
                spec = pending.pop(ref)
                done.append(ray.get(ref))  # a task that failed raises here: the finally cancels the others
                if progress:
                    progress.advance(spec["end"] - spec["start"])
            if stop_at_error and any(summary["error"] for summary in done):
                break
    finally:
        for ref in pending:
            ray.cancel(ref)
        if progress:
            progress.close()
    return sorted(done, key=lambda summary: summary["index"])


def first_error(source: str, summaries: list[dict]) -> str | None:
    """The first bad line among `summaries` (in chunk order) as `file:line: reason`. The line is counted
    from the chunks before it, or read from the file where one of them did not finish."""
    lines_before, expected = 0, 0
    for summary in summaries:
        if summary["index"] != expected:
            lines_before = None
        expected = summary["index"] + 1
        if summary["error"]:
            local_line, reason = summary["error"]
            before = lines_before if lines_before is not None else count_lines(source, summary["start"])
            return f"{source}:{before + local_line}: {reason}"
        if lines_before is not None:
            lines_before += summary["lines"]
    return None


def count_lines(source: str, end: int) -> int:
    """Line ends in the first `end` bytes of `source`."""
    filesystem, path = storage.filesystem_of(source)
    with filesystem.open_input_file(path) as file:
        return sum(file.read_at(min(16 << 20, end - start), start).count(b"\n") for start in range(0, end, 16 << 20))


class Progress:
    """Long work in chunks, as it goes: chunks done, MB, MB/s and ETA. On a terminal one line rewritten
    in place at each chunk; in a log one line each `step` of the bytes. Work shorter than `quiet_s`
    seconds says nothing."""

    def __init__(
        self,
        label: str,
        total_bytes: int,
        chunks: int,
        stream=None,
        clock=time.monotonic,
        step: float = 0.05,
        quiet_s: float = 5.0,
    ):
        self.label, self.total_bytes, self.chunks, self.step, self.quiet_s = label, total_bytes, chunks, step, quiet_s
        self.stream, self.clock = stream or sys.stdout, clock
        self.terminal = self.stream.isatty()
        self.started, self.done_bytes, self.done_chunks, self.next_share, self.shown = clock(), 0, 0, step, False

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_chunks += 1
        share = self.done_bytes / max(1, self.total_bytes)
        if self.clock() - self.started < self.quiet_s:
            return
        if self.terminal:
            self.stream.write(f"\r{self.line()}\x1b[K")
            self.shown = True
        elif share >= self.next_share or self.done_chunks == self.chunks:
            self.stream.write(self.line() + "\n")
            self.next_share = (math.floor(share / self.step + 1e-9) + 1) * self.step
        self.stream.flush()

    def line(self) -> str:
        seconds = max(self.clock() - self.started, 1e-9)
        rate = self.done_bytes / seconds
        left = (self.total_bytes - self.done_bytes) / rate if rate else float("inf")
        eta = "?" if left == float("inf") else f"{int(left) // 60}m{int(left) % 60:02d}s"
        return (
            f"{self.label}: {self.done_chunks}/{self.chunks} chunks, "
            f"{self.done_bytes / 1e6:,.0f}/{self.total_bytes / 1e6:,.0f} MB "
            f"({self.done_bytes / max(1, self.total_bytes):.0%}), {rate / 1e6:.1f} MB/s, ETA {eta}"
        )

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


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


def count_duplicates(summaries: list[dict]) -> int:
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


def record_text(record: dict, kind: str) -> tuple[str, bool]:
    """All the text of a record (for the garbage checks) and whether a reply in it is blank."""
    if kind == "pretrain":
        return record["text"], False
    messages = record["chosen"] + record["rejected"] if kind == "dpo" else record["conversations"]
    blank = any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in messages)
    return "\n".join(m["content"] for m in messages), blank


def record_hash(record: dict, kind: str) -> int:
    """Of the fields the stage uses, as parsed: the same record counts as a duplicate whatever its spacing or key order."""
    if kind == "pretrain":  # its one field: the text alone says the same, without a JSON round trip
        data = record["text"].encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_digests(source: str, raw: bytes, start: int, end: int, size: int) -> list[bytes]:
    """The sha256 of each BLOCK_BYTES block of the file that starts in [start, end), whose bytes `raw`
    holds (the last block's rest, past `end`, is read): every block is hashed by exactly one chunk."""
    view, digests = memoryview(raw), []
    for block in range(-(-start // BLOCK_BYTES), -(-end // BLOCK_BYTES)):
        low, high = block * BLOCK_BYTES, min((block + 1) * BLOCK_BYTES, size)
        digest = hashlib.sha256(view[low - start : min(high, end) - start])
        if high > end:
            digest.update(_read_range(source, end, high))
        digests.append(digest.digest())
    return digests


def _lines(raw: bytes, first_in_file: bool):
    """(line, its start as a share of the chunk) for each line of a chunk; a line is a str, or the
    UnicodeDecodeError that decoding it raised. One decode for the whole chunk when it is valid UTF-8."""
    if first_in_file and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # as utf-8-sig reads it (the positions shift by 3 bytes: the report's slices are 5% wide)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        lines, length, position = raw.split(b"\n"), max(1, len(raw)), 0
        if lines and lines[-1] == b"":
            lines.pop()
        for line in lines:
            try:
                yield line.decode("utf-8"), position / length
            except UnicodeDecodeError as error:
                yield error, position / length
            position += len(line) + 1
        return
    del raw
    lines, length, position = text.split("\n"), max(1, len(text)), 0
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        yield line, position / length
        position += len(line) + 1


def process_chunk(
    spec: dict,
    mode: str,
    skip_bad: bool,
    tokenizer=None,
    stage: StageData | None = None,
    marker_ids=None,
    output: str | None = None,
    evaluation: EvalSet | None = None,
) -> dict:
    """Validate (and in "encode" mode, hash, tokenize and write; in "contamination" mode, look up in
    `evaluation`) the lines of one byte range of the source. Records are encoded BATCH_RECORDS at a time and
    kept only as arrays: a task's memory is its chunk's bytes and tokens, whatever the file's size."""
    start, end, kind = spec["start"], spec["end"], spec["kind"]
    raw = _read_range(spec["source"], start, end)
    summary = {
        "index": spec["index"],
        "start": start,
        "lines": 0,
        "error": None,
        "skipped": 0,
        "rows": 0,
        "tokens": 0,
        "unlabelled": 0,
        "shard": f"shard-{spec['index']:05d}",
        "stats": data_report.ChunkStats(),
        "blocks": [],
    }
    if mode == "encode":
        summary["blocks"] = block_digests(spec["source"], raw, start, end, spec["size"])
    stats, span, file_size = summary["stats"], (end - start) / max(1, spec["size"]), max(1, spec["size"])
    hashes, batch, dropped = [], [], set(spec.get("drop", []))
    encoder = ChunkEncoder(tokenizer, stage, marker_ids, summary) if mode == "encode" else None
    overlap = summary["overlap"] = Overlap() if mode == "contamination" else None
    number = 0
    for number, (line, share) in enumerate(_lines(raw, start == 0), start=1):
        if isinstance(line, UnicodeDecodeError):
            reason = f"not valid UTF-8 (byte {line.start + 1} of the line: {line.object[line.start : line.start + 4]!r})"
        elif not line.strip():
            continue
        else:
            try:
                record = validate_record(json.loads(line), kind)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                reason = str(error)
            else:
                hashes.append(record_hash(record, kind))
                if overlap is not None:
                    overlap.add(evaluation, record_text(record, kind)[0], (spec["index"], number))
                if encoder is None or len(hashes) - 1 in dropped:
                    continue
                recorded_text, empty = record_text(record, kind)
                blank = is_blank(record, kind)
                stats.add_record(recorded_text, start / file_size + share * span, empty=empty, blank=blank)
                if not blank:
                    batch.append(record)
                    if len(batch) == BATCH_RECORDS:
                        encoder.add(batch)
                        batch = []
                continue
        summary["skipped"] += 1
        summary["error"] = summary["error"] or (number, reason)
        if not skip_bad:
            return {**summary, "lines": number, "hashes": np.zeros(0, np.uint64)}
    del raw
    summary["lines"] = number
    summary["hashes"] = np.asarray(hashes, dtype=np.uint64)
    if encoder is None:
        return summary
    if batch:
        encoder.add(batch)
    write_shard(storage.join(output, summary["shard"]), encoder.columns())
    _release_freed_memory()
    return summary


def write_shard(location: str, columns: dict) -> None:
    """One shard's columns: arrays as .npy, a VLM's image names per row as images.json."""
    filesystem, folder = storage.filesystem_of(location)
    filesystem.create_dir(folder, recursive=True)
    for name, array in columns.items():
        if name == "images":
            write_text(filesystem, f"{folder}/images.json", json.dumps(array, ensure_ascii=False))
        else:
            write_array(filesystem, f"{folder}/{name}.npy", array)


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


class ChunkEncoder:
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
            backend = self.tokenizer.backend_tokenizer
            encode = getattr(
                backend, "encode_batch_fast", backend.encode_batch
            )  # the same ids, without offsets: a fifth less CPU
            encodings = encode([bos + r["text"] + eos for r in records], add_special_tokens=False)
            lengths = [len(encoding) for encoding in encodings]
            ids = np.fromiter(chain.from_iterable(encoding.ids for encoding in encodings), dtype=self.dtype, count=sum(lengths))
            self.pieces.setdefault("input_ids", []).append(ids)  # one array per batch, not one per document
            self.stats.add_lengths(lengths)
            self.stats.add_tokens("text", len(ids))
            return
        rows = stage_arrays(records, self.stage, self.tokenizer, self.marker_ids)
        kept = [
            row for row in rows if all(row[side + "supervised"].any() for side in self.sides)
        ]  # a cut can remove every supervised token
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
                    columns.update(
                        {
                            side + "input_ids": np.zeros(0, self.dtype),
                            side + "offsets": np.zeros(1, np.int64),
                            side + "mask": np.zeros(0, np.uint8),
                        }
                    )
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
