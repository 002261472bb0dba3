"""Contamination: which evaluation documents share a 13-gram with the training data (GPT-3's test, section 4
and appendix C of its paper), so that "97% on C-Eval" is never a leak.

Text is compared as units: each Chinese character is one, any other run of letters and digits is one
(lowercased); punctuation and spaces are not units, so spacing and punctuation changes still match. An
evaluation document (the task's prompt and its right answer) is dirty when any of its 13-grams occurs in
any training record; its overlap is the share of its 13-grams that do. Documents shorter than 13 units
cannot be checked this way and are counted apart.

    evaluation = EvalSet({"ceval-valid": [text, ...], ...})        # on the driver, sent to every task once
    found = Overlap(); found.add(evaluation, record_text, (chunk, line))   # per training record, in each task
    report = contamination_report(evaluation, Overlap.merge(parts), where)   # per task: dirty rate, worst examples
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

N = 13
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNITS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_BASE = 1_000_003  # the rolling hash's multiplier: odd, so no unit's id is lost modulo 2**64
WORST = 5  # examples per task in the report
DIRTY_FLAG_RATE = 0.01  # a task with more dirty documents than this is flagged


def units(text: str) -> list[str]:
    return _UNITS.findall(text.lower())


def gram_hashes(text: str, n: int = N) -> np.ndarray:
    """A 64-bit hash of each n-gram of units, in order (empty when the text has fewer than n units). Stable
    across processes: a unit's id is its CRC-32, not Python's seeded `hash`."""
    ids = np.array([zlib.crc32(unit.encode("utf-8", "surrogatepass")) for unit in units(text)], dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, np.uint64)
    powers = np.array([pow(_BASE, n - 1 - k, 1 << 64) for k in range(n)], dtype=np.uint64)
    return np.lib.stride_tricks.sliding_window_view(ids, n) @ powers  # integer products wrap modulo 2**64


@dataclass
class EvalSet:
    """Evaluation documents by task, indexed by their 13-grams (sorted hashes, each with its document)."""

    texts: dict[str, list[str]]
    doc_task: list[str] = field(init=False)
    doc_text: list[str] = field(init=False)
    doc_grams: np.ndarray = field(init=False)  # distinct 13-grams per document (0: too short to check)
    hashes: np.ndarray = field(init=False)
    docs: np.ndarray = field(init=False)

    def __post_init__(self):
        self.doc_task, self.doc_text, counts, hash_parts, doc_parts = [], [], [], [], []
        for task, texts in self.texts.items():
            for text in texts:
                grams = np.unique(gram_hashes(text))
                hash_parts.append(grams)
                doc_parts.append(np.full(len(grams), len(self.doc_text), dtype=np.int64))
                self.doc_task.append(task)
                self.doc_text.append(text)
                counts.append(len(grams))
        self.doc_grams = np.asarray(counts, dtype=np.int64)
        hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64)
        docs = np.concatenate(doc_parts) if doc_parts else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.docs = hashes[order], docs[order]

    def docs_sharing(self, text: str) -> dict[int, np.ndarray]:
        """Document -> the hashes of its 13-grams that `text` also has."""
        grams = np.unique(gram_hashes(text))
        if not len(grams) or not len(self.hashes):
            return {}
        # binary search in the sorted index: O(grams x log index) per record (np.isin sorts the whole index each call)
        low = np.searchsorted(self.hashes, grams, "left")
        present = self.hashes[np.minimum(low, len(self.hashes) - 1)] == grams
        grams, low = grams[present], low[present]
        high = np.searchsorted(self.hashes, grams, "right")
        found: dict[int, list[int]] = {}
        for gram, start, end in zip(grams, low, high):
            for doc in self.docs[start:end]:
                found.setdefault(int(doc), []).append(gram)
        return {doc: np.asarray(matched, dtype=np.uint64) for doc, matched in found.items()}


@dataclass
class Overlap:
    """What training records share with the evaluation documents: per dirty document, its 13-grams found
    and the first record (a location: (chunk, line)) that had one."""

    matched: dict[int, set] = field(default_factory=dict)
    first_seen: dict[int, tuple] = field(default_factory=dict)

    def add(self, evaluation: EvalSet, text: str, location: tuple) -> None:
        for doc, grams in evaluation.docs_sharing(text).items():
            self.matched.setdefault(doc, set()).update(grams.tolist())
            self.first_seen[doc] = min(self.first_seen.get(doc, location), location)

    @classmethod
    def merge(cls, parts: list["Overlap"]) -> "Overlap":
        total = cls()
        for part in parts:
            for doc, grams in part.matched.items():
                total.matched.setdefault(doc, set()).update(grams)
                total.first_seen[doc] = min(total.first_seen.get(doc, part.first_seen[doc]), part.first_seen[doc])
        return total


def contamination_report(evaluation: EvalSet, overlap: Overlap, where=lambda location: str(location),
                         worst: int = WORST) -> dict:
    """Per task: documents, how many could be checked, how many are dirty (and the rate among those checked),
    the mean overlap of the dirty ones, and the `worst` documents by overlap, each with the training record
    where one of its 13-grams was first found (`where(location)`, e.g. "file.jsonl:123"). Plus `flags`."""
    tasks: dict[str, dict] = {}
    for task in evaluation.texts:
        indices = [i for i, name in enumerate(evaluation.doc_task) if name == task]
        checked = [i for i in indices if evaluation.doc_grams[i]]
        dirty = sorted((i for i in checked if i in overlap.matched),
                       key=lambda i: (-len(overlap.matched[i]) / evaluation.doc_grams[i], i))
        shares = [len(overlap.matched[i]) / evaluation.doc_grams[i] for i in dirty]
        tasks[task] = {
            "docs": len(indices),
            "checked": len(checked),
            "too_short": len(indices) - len(checked),
            "dirty": len(dirty),
            "dirty_rate": len(dirty) / len(checked) if checked else 0.0,
            "mean_overlap_of_dirty": float(np.mean(shares)) if shares else 0.0,
            "worst": [{"doc": indices.index(i), "overlap": round(len(overlap.matched[i]) / evaluation.doc_grams[i], 4),
                       "text": evaluation.doc_text[i][:200], "found_at": where(overlap.first_seen[i])} for i in dirty[:worst]],
        }
    flags = [f"contamination: {task}: {figures['dirty']} of its {figures['checked']} checked documents "
             f"({figures['dirty_rate']:.1%}) share a {N}-gram with this data"
             for task, figures in tasks.items() if figures["dirty_rate"] > DIRTY_FLAG_RATE]
    return {"n": N, "tasks": tasks, "flags": flags}
