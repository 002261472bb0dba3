"""The data report: what a file holds before a model trains on it.

The seed's text model saw its loss jump at the end of pretraining because the file's tail was noisy. So
the preparation job counts, per chunk of the file and then for the whole: the row length distribution,
exact duplicates, empty replies, blank pretraining texts (left out), garbage (U+FFFD replacement
characters, control characters, no CJK or Latin letter at all), rows cut at seq_len, and tokens per
field; and where in the file the garbage lies (20 slices by byte position), so a noisy tail is flagged
before training instead of after.

    stats = ChunkStats(); stats.add_record(texts, byte_position / file_size, empty=...) ...
    report = finish(merge([stats of every chunk]), duplicates=...)   -> dict, JSON-serialisable
    write_plot(report, "report.png")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

LENGTH_BINS = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 62]  # tokens per row
POSITIONS = 20  # slices of the file by byte position
TAIL = 2  # the last 10% of the file

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text
_LETTER = re.compile(r"[A-Za-z\u00c0-\u024f\u3400-\u4dbf\u4e00-\u9fff]")


def garbage_kinds(text: str) -> list[str]:
    """Why `text` looks like garbage (empty list: it does not)."""
    kinds = []
    if "\ufffd" in text:
        kinds.append("replacement_char")
    if _CONTROL.search(text):
        kinds.append("control_char")
    if not _LETTER.search(text):
        kinds.append("no_letters")
    return kinds


@dataclass
class ChunkStats:
    records: int = 0
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    empty: int = 0
    blank: int = 0  # pretraining records with an empty or whitespace-only text: left out of the rows
    garbage: int = 0
    garbage_kinds: dict = field(default_factory=dict)
    tokens_per_field: dict = field(default_factory=dict)
    lengths: list = field(default_factory=lambda: [0] * (len(LENGTH_BINS) - 1))
    position_records: list = field(default_factory=lambda: [0] * POSITIONS)
    position_garbage: list = field(default_factory=lambda: [0] * POSITIONS)

    def add_record(self, text: str, position: float, empty: bool = False, blank: bool = False) -> None:
        """One validated record: all its text, where it starts in the file (0..1), whether a reply is
        blank (`empty`) or the whole text is (`blank`: the record is left out)."""
        slot = min(POSITIONS - 1, int(position * POSITIONS))
        self.records += 1
        self.position_records[slot] += 1
        self.empty += bool(empty)
        self.blank += bool(blank)
        kinds = garbage_kinds(text)
        if kinds:
            self.garbage += 1
            self.position_garbage[slot] += 1
            for kind in kinds:
                self.garbage_kinds[kind] = self.garbage_kinds.get(kind, 0) + 1

    def add_lengths(self, lengths) -> None:
        """Row lengths in tokens (documents, for pretraining)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
        self.lengths = (np.asarray(self.lengths) + counts).tolist()

    def add_tokens(self, field_name: str, count: int) -> None:
        self.tokens_per_field[field_name] = self.tokens_per_field.get(field_name, 0) + int(count)


def merge(chunks: list[ChunkStats]) -> ChunkStats:
    total = ChunkStats()
    for chunk in chunks:
        for name in ("records", "rows", "tokens", "truncated", "empty", "blank", "garbage"):
            setattr(total, name, getattr(total, name) + getattr(chunk, name))
        for name in ("lengths", "position_records", "position_garbage"):
            setattr(total, name, [a + b for a, b in zip(getattr(total, name), getattr(chunk, name))])
        for name in ("garbage_kinds", "tokens_per_field"):
            merged = getattr(total, name)
            for key, value in getattr(chunk, name).items():
                merged[key] = merged.get(key, 0) + value
    return total


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def finish(
    stats: ChunkStats, duplicates: int = 0, duplicates_dropped: int = 0, skipped_lines: int = 0, unlabelled_dropped: int = 0
) -> dict:
    """The report: counts, rates, the length histogram, garbage by file position, and flags (one line each)."""
    records = stats.records
    tail_records, tail_garbage = sum(stats.position_records[-TAIL:]), sum(stats.position_garbage[-TAIL:])
    rest_records, rest_garbage = records - tail_records, stats.garbage - tail_garbage
    report = {
        "records": records,
        "rows": stats.rows,
        "tokens": stats.tokens,
        "skipped_lines": skipped_lines,
        "duplicates": duplicates,
        "duplicate_rate": _rate(duplicates, records),
        "duplicates_dropped": duplicates_dropped,
        "empty": stats.empty,
        "empty_rate": _rate(stats.empty, records),
        "blank_skipped": stats.blank,
        "garbage": stats.garbage,
        "garbage_rate": _rate(stats.garbage, records),
        "garbage_kinds": stats.garbage_kinds,
        "truncated": stats.truncated,
        "truncated_rate": _rate(stats.truncated, stats.rows),
        "unlabelled_dropped": unlabelled_dropped,
        "tokens_per_field": stats.tokens_per_field,
        "length_histogram": {"bins": LENGTH_BINS[:-1], "counts": stats.lengths},
        "garbage_by_position": {"slices": POSITIONS, "records": stats.position_records, "garbage": stats.position_garbage},
        "tail_garbage_rate": _rate(tail_garbage, tail_records),
        "rest_garbage_rate": _rate(rest_garbage, rest_records),
    }
    flags = []
    if tail_records and report["tail_garbage_rate"] >= max(0.05, 3 * report["rest_garbage_rate"]):
        flags.append(
            f"noisy tail: {report['tail_garbage_rate']:.1%} of the records in the last {TAIL * 100 // POSITIONS}% of the file "
            f"are garbage, {report['rest_garbage_rate']:.1%} before it"
        )
    if report["garbage_rate"] >= 0.01:
        flags.append(
            f"garbage: {report['garbage_rate']:.1%} of the records "
            f"({', '.join(f'{k} {v}' for k, v in stats.garbage_kinds.items())})"
        )
    if report["duplicate_rate"] >= 0.01:
        flags.append(
            f"duplicates: {report['duplicate_rate']:.1%} of the records are exact repeats"
            + ("" if duplicates_dropped else " (--drop-duplicates removes them)")
        )
    if report["empty_rate"] >= 0.01:
        flags.append(f"empty: {report['empty_rate']:.1%} of the records have a blank reply")
    if stats.blank:
        flags.append(
            f"blank: {stats.blank} records ({_rate(stats.blank, records):.1%}) have an empty or whitespace-only text (left out)"
        )
    if report["truncated_rate"] >= 0.05:
        flags.append(f"truncated: {report['truncated_rate']:.1%} of the rows are cut at seq_len")
    if skipped_lines:
        flags.append(f"skipped: {skipped_lines} malformed lines")
    report["flags"] = flags
    return report


def metrics(report: dict) -> dict:
    """The report's numbers as MLflow metrics of the stage run."""
    names = (
        "records",
        "rows",
        "tokens",
        "skipped_lines",
        "duplicate_rate",
        "duplicates_dropped",
        "empty_rate",
        "garbage_rate",
        "truncated_rate",
        "unlabelled_dropped",
        "tail_garbage_rate",
    )
    return {f"data/{name}": float(report[name]) for name in names}


def write_plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lengths, positions) = plt.subplots(1, 2, figsize=(11, 3.6))
    bins = report["length_histogram"]["bins"]
    labels = [f"{low}-{high - 1}" for low, high in zip(bins, bins[1:])] + [f"{bins[-1]}+"]
    lengths.bar(range(len(labels)), report["length_histogram"]["counts"], color="#4c72b0")
    lengths.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    lengths.set_title("row length (tokens)")
    lengths.set_ylabel("rows")
    by_position = report["garbage_by_position"]
    rates = [_rate(g, r) for g, r in zip(by_position["garbage"], by_position["records"])]
    slices = by_position["slices"]
    positions.bar([100 * (i + 0.5) / slices for i in range(slices)], rates, width=90 / slices, color="#c44e52")
    positions.set_title("garbage rate by position in the file")
    positions.set_xlabel("% of the file")
    positions.set_ylim(0, max([0.05, *rates]) * 1.1)
    figure.suptitle(
        f"{report['records']:,} records, {report['rows']:,} rows, {report['tokens']:,} tokens; "
        f"duplicates {report['duplicate_rate']:.1%}, garbage {report['garbage_rate']:.1%}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
