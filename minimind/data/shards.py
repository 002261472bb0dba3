"""Prepared data on disk: compact NumPy shards + a manifest, and the reader the training loop uses.

    <prepared>/<key>/manifest.json            rows, tokens, settings, digests, shards (written last: it
                                             marks the folder complete)
    <prepared>/<key>/report.json, report.png the data report (minimind.data.report)
    <prepared>/<key>/shard-00000/            one per chunk of the source file, in file order:
        input_ids.npy      every row's token ids, end to end (uint16 when the vocabulary fits)
        offsets.npy        where each row starts in input_ids (rows + 1 entries)
        mask.npy           one bit per token: supervised or not (labels are the ids there, -100 elsewhere)
        truncated.npy      one byte per row: seq_len cut it
        images.json        vlm: each row's image file names (Parquet data: indices into image_bytes)
        image_bytes.npy    Parquet vlm data: the shard's images' bytes end to end (decoded by the loader)
        image_offsets.npy  where each image starts in image_bytes (images + 1 entries)
    DPO keeps two of each, `chosen_*` and `rejected_*`. Pretraining keeps only `input_ids`: its rows are
    the windows of seq_len tokens over the documents laid end to end (`pack_documents`), so row r is
    tokens [r * seq_len, (r + 1) * seq_len) of the whole stream, wherever the shards split it.

Loss weights are not stored: a supervised tag token gets the stage's tag weight, any other supervised
token 1, so changing `--tag-weight` reuses the same shards.
"""

from __future__ import annotations

import io
import json
from bisect import bisect_right
from pathlib import Path

import numpy as np

from minimind.data.rows import tag_weights
from minimind.model.losses import IGNORE_INDEX

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_array(filesystem, path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with filesystem.open_output_stream(path) as out:
        out.write(buffer.getvalue())


def write_text(filesystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as out:
        out.write(text.encode())


def pack_rows(rows: list[dict], prefix: str, dtype) -> dict[str, np.ndarray]:
    """The columns of a batch of rows (`minimind.data.rows.stage_arrays`) for one side (prefix "" or
    "chosen_"/"rejected_"): ids end to end, row offsets, the supervised mask (packed to bits by the writer)."""
    ids = [row[prefix + "input_ids"] for row in rows]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
    supervised = np.concatenate([row[prefix + "supervised"] for row in rows]) if rows else np.zeros(0, bool)
    return {prefix + "input_ids": flat, prefix + "offsets": offsets, prefix + "mask": supervised}


class PreparedRows:
    """The rows of a prepared folder, as `load_stage_dataset` gives them (lists of ints, labels -100
    where no loss is wanted), read from memory-mapped shards: a process touches only the pages of the
    rows it asks for. Picklable without its arrays (DataLoader workers open their own maps)."""

    def __init__(self, directory: str | Path, tag_weight: float = 10.0):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.kind, self.seq_len = self.manifest["kind"], self.manifest["seq_len"]
        self.tag_weight = tag_weight
        self.tag_sequences = self.manifest.get("tag_sequences") or [[i] for i in self.manifest.get("tag_ids", [])]
        self.sides = ("chosen_", "rejected_") if self.kind == "dpo" else ("",)
        self._row_starts = np.cumsum([0] + [shard["rows"] for shard in self.manifest["shards"]])[:-1].tolist()
        self._maps = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    # ---- opening

    def _shards(self) -> list[dict]:
        if self._maps is None:
            self._maps = []
            for shard in self.manifest["shards"]:
                folder = self.directory / shard["name"]
                arrays = {path.stem: np.load(path, mmap_mode="r") for path in folder.glob("*.npy")}
                if (folder / "images.json").is_file():
                    arrays["images"] = json.loads((folder / "images.json").read_text())
                self._maps.append(arrays)
        return self._maps

    def __len__(self) -> int:
        return self.manifest["rows"]

    def lengths(self) -> np.ndarray:
        """Every row's length in tokens (the longer side for DPO), in row order, without reading tokens."""
        if self.kind == "pretrain":
            lengths = np.full(len(self), self.seq_len, dtype=np.int64)
            if len(self):
                lengths[-1] = self.manifest["tokens"] - (len(self) - 1) * self.seq_len
            return lengths
        parts = []
        for arrays in self._shards():
            parts.append(np.max([np.diff(arrays[side + "offsets"]) for side in self.sides], axis=0))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ---- rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.kind == "pretrain":
            return self._window(index)
        starts = self._row_starts
        shard = bisect_right(starts, index) - 1
        arrays, local = self._shards()[shard], index - starts[shard]
        row = {}
        for side in self.sides:
            start, end = (int(x) for x in arrays[side + "offsets"][local : local + 2])
            ids = arrays[side + "input_ids"][start:end].astype(np.int64)
            supervised = _bits(arrays[side + "mask"], start, end)
            row[side + "input_ids"] = ids.tolist()
            row[side + "labels"] = np.where(supervised, ids, IGNORE_INDEX).tolist()
        row["truncated"] = bool(arrays["truncated"][local])
        if self.kind == "reason":
            row["loss_weights"] = tag_weights(ids, supervised, self.tag_sequences, self.tag_weight).tolist()
        if "images" in arrays:
            row["images"] = arrays["images"][local]
            if "image_offsets" in arrays:  # the images themselves, as bytes
                offsets, blob = arrays["image_offsets"], arrays["image_bytes"]
                row["images"] = [blob[offsets[int(i)] : offsets[int(i) + 1]].tobytes() for i in row["images"]]
        return row

    def _window(self, index: int) -> dict:
        """Row `index` of the packed stream: seq_len tokens, the last row padded (its `length` says how much is real)."""
        start, end = index * self.seq_len, min((index + 1) * self.seq_len, self.manifest["tokens"])
        pieces, first = [], 0
        for shard, arrays in zip(self.manifest["shards"], self._shards()):
            last = first + shard["tokens"]
            if last > start and first < end:
                pieces.append(arrays["input_ids"][max(start, first) - first : min(end, last) - first])
            first = last
        ids = np.concatenate(pieces).astype(np.int64).tolist() if pieces else []
        return {"input_ids": ids + [self.manifest["pad_id"]] * (self.seq_len - len(ids)), "length": len(ids)}

    def image_names(self) -> set[str]:
        """The image files the rows name (none when the shards hold the images' bytes)."""
        named = [arrays.get("images", []) for arrays in self._shards() if "image_offsets" not in arrays]
        return {name for rows in named for row in rows for name in row}


def _bits(packed: np.ndarray, start: int, end: int) -> np.ndarray:
    """Bits [start, end) of a packbits array."""
    if end <= start:
        return np.zeros(0, dtype=bool)
    unpacked = np.unpackbits(packed[start // 8 : (end + 7) // 8])
    return unpacked[start % 8 : start % 8 + end - start].astype(bool)
