"""Datasets of every stage, from MiniMind's JSONL formats, through Hugging Face `datasets`.

    pretrain   {"text": ...}                                   -> packed rows of seq_len tokens
    sft        {"conversations": [{"role", "content"}, ...]}   -> ids + labels on every assistant reply
    reason     SFT whose replies are <think>…</think><answer>…</answer> -> + loss weights on the tags
    dpo        {"chosen": [messages], "rejected": [messages]}  -> both sides, labels on the final reply
    vlm        SFT + "image": "a.png[,b.png]", <image> in the text -> + image paths, expanded placeholders

Files are read line by line and validated: a malformed line raises `DataFormatError` naming the file
and line, or with `skip_bad=True` is skipped and counted. Records land in `datasets`' memory-mapped
Arrow cache, never in one Python list, so files larger than memory work.

Labels are aligned with the input ids (-100 where no loss is wanted); the model shifts them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from minimind import storage
from minimind.data.tools import check_calls, check_result, check_tools, tool_names
from minimind.model.losses import IGNORE_INDEX
from minimind.model.tokenizer import Markers

KINDS = ("pretrain", "sft", "reason", "dpo", "vlm")
ROLES = ("system", "user", "assistant", "tool")
IMAGE_MARKER = "<image>"  # how MiniMind-V's JSONL marks an image's place in the text


class DataFormatError(ValueError):
    pass


# --------------------------------------------------------------------------- reading and validation


def _check_message(message, index: int, name: str, names: set[str] | None, before: list[dict]) -> dict:
    """One message, checked; returns the fields a stage uses (others, such as a name, are left out)."""
    where = f'"{name}"[{index}]'
    if not isinstance(message, dict):
        raise ValueError(f"{where} is not a message object")
    if message.get("role") not in ROLES:
        raise ValueError(f"{where} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
    calls = message.get("tool_calls") if message["role"] == "assistant" else None
    content = "" if calls and message.get("content") is None else message.get("content")
    if not isinstance(content, str):
        raise ValueError(f'{where} needs a string "content"')
    kept = {"role": message["role"], "content": content}
    if message.get("reasoning_content") is not None and not isinstance(message["reasoning_content"], str):
        raise ValueError(f'{where} has a "reasoning_content" that is not a string')
    if message.get("reasoning_content"):
        kept["reasoning_content"] = message["reasoning_content"]
    if calls:
        kept["tool_calls"] = check_calls(calls, where, names)
    if message["role"] == "tool":
        check_result(message, where, before)
    return kept


def _check_messages(messages, name: str, tools: list[dict] | None = None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{name}" must be a non-empty list of messages')
    kept, names = [], tool_names(tools)
    for index, message in enumerate(messages):
        kept.append(_check_message(message, index, name, names, kept))
    if not any(message["role"] == "assistant" for message in kept):
        raise ValueError(f'"{name}" has no assistant reply to learn from')
    return kept


def _record_tools(record: dict) -> list[dict] | None:
    """A record's tools: its own "tools" (OpenAI's request shape), or its system message's."""
    messages = record.get("conversations") or record.get("chosen") or []
    first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
    tools = record.get("tools") or (first.get("tools") if first.get("role") == "system" else None)
    return check_tools(tools) if tools else None


def validate_record(record, kind: str) -> dict:
    """The fields a stage uses, checked; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if kind == "pretrain":  # an empty or blank text is well-formed: a data-quality fact (`is_blank`), not an error
        if not isinstance(record.get("text"), str):
            raise ValueError('needs a string "text"')
        return {"text": record["text"]}
    tools = _record_tools(record)
    with_tools = {"tools": tools} if tools else {}
    if kind == "dpo":
        chosen = _check_messages(record.get("chosen"), "chosen", tools)
        rejected = _check_messages(record.get("rejected"), "rejected", tools)
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError('"chosen" and "rejected" must each end with an assistant reply')
        return {"chosen": chosen, "rejected": rejected, **with_tools}
    if kind in ("sft", "reason", "vlm"):  # reason: the SFT format, replies in <think>/<answer> form
        validated = {"conversations": _check_messages(record.get("conversations"), "conversations", tools), **with_tools}
        if kind == "vlm":
            images = record.get("image") or ""
            if not isinstance(images, str):
                raise ValueError('"image" must be a string of comma-separated file names')
            validated["images"] = [name.strip() for name in images.split(",") if name.strip()]
            markers = sum(m["content"].count(IMAGE_MARKER) for m in validated["conversations"])
            if markers != len(validated["images"]):
                raise ValueError(f"{markers} {IMAGE_MARKER} marker(s) in the text but {len(validated['images'])} image(s)")
        return validated
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")


def is_blank(record: dict, kind: str) -> bool:
    """A pretraining record whose text is empty or only whitespace: nothing to learn, left out (and
    counted by the data report), as a blank line is."""
    return kind == "pretrain" and not record["text"].strip()


def iter_jsonl(path: str | Path, kind: str, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, validated record) for each non-blank line of `path`, leaving out blank records
    (`is_blank`). Files as editors save them are fine: a UTF-8 byte-order mark, CRLF line ends, blank
    lines. A line that is not UTF-8 is a malformed line like any other (named, or skipped and counted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    with path.open("rb") as lines:  # bytes: a bad byte then belongs to its line, not to the whole read
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if not line.strip():
                    continue
                record = validate_record(json.loads(line), kind)
            except UnicodeDecodeError as error:
                if not skip_bad:
                    raise DataFormatError(f"{path}:{number}: not valid UTF-8 (byte {error.start + 1} of the line: "
                                          f"{raw[error.start:error.start + 4]!r})") from None
            except (json.JSONDecodeError, ValueError) as error:
                if not skip_bad:
                    raise DataFormatError(f"{path}:{number}: {error}") from None
            else:
                if not is_blank(record, kind):
                    yield number, record


def count_records(path: str | Path) -> int:
    """Non-blank lines (a line holding only a byte-order mark counts as blank)."""
    with Path(path).open("rb") as lines:
        return sum(
            1
            for number, line in enumerate(lines, start=1)
            if (line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line).strip()
        )


def _records(path: str, kind: str, skip_bad: bool, file_stamp: tuple):  # file_stamp: only for the cache key
    for _, record in iter_jsonl(path, kind, skip_bad):
        yield record


def read_jsonl_dataset(path: str | Path, kind: str, skip_bad: bool = False, cache_dir: str | None = None):
    """A memory-mapped `datasets.Dataset` of validated records (blank ones left out, see `is_blank`)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    stat = path.stat()
    try:
        return Dataset.from_generator(
            _records,
            # the content digest too: `cp -p`, `rsync -a` and `tar x` keep the size and mtime of an edited file
            gen_kwargs={
                "path": str(path),
                "kind": kind,
                "skip_bad": skip_bad,
                "file_stamp": (stat.st_size, stat.st_mtime_ns, storage.file_sha256(path)),
            },
            cache_dir=cache_dir,
        )
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, DataFormatError):
            raise error.__cause__ from None  # the file:line message, not datasets' generic wrapper
        raise


# --------------------------------------------------------------------------- conversations -> tokens


def _spans_by_prefixes(tokenizer, messages: list[dict], only_last: bool, tools=None) -> tuple[str, list[tuple[int, int]]]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or (only_last and index != len(messages) - 1):
            continue
        through_reply = tokenizer.apply_chat_template(messages[: index + 1], tools=tools, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:index], tools=tools, tokenize=False, add_generation_prompt=True)
        if not through_reply.startswith(prompt):  # a reply with reasoning: the prompt that opens a think block
            prompt = tokenizer.apply_chat_template(messages[:index], tools=tools, tokenize=False, add_generation_prompt=True,
                                                   open_thinking=True)
        if not (text.startswith(through_reply) and through_reply.startswith(prompt)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        end_of_turn = through_reply.rfind(tokenizer.eos_token, len(prompt)) if tokenizer.eos_token else -1
        end = end_of_turn + len(tokenizer.eos_token) if end_of_turn >= 0 else len(through_reply)
        spans.append((len(prompt), end))
    return text, spans


def _render(messages: list[dict], tokenizer) -> str:
    """The chat template rendered straight from its compiled form, as `apply_chat_template` renders it
    for plain messages without its per-call conversion of every message (a third of the time)."""
    from transformers.utils.chat_template_utils import (
        _compile_jinja_template,  # private (and cached): checked against apply_chat_template
    )

    compiled = _compile_jinja_template(tokenizer.chat_template)
    return compiled.render(
        messages=messages, tools=None, documents=None, add_generation_prompt=False, **tokenizer.special_tokens_map
    )


def _spans_by_sentinels(tokenizer, messages: list[dict], only_last: bool):
    """The same in one render: each message's content replaced by a sentinel, found, then put back.
    None when the template does not place every content exactly once (it transforms them), or a reply
    carries `reasoning_content` or tool calls (its supervised span is more than its content)."""
    if any("reasoning_content" in message or "tool_calls" in message for message in messages):
        return None
    sentinels = [f"\ue000{index}\ue001" for index in range(len(messages))]
    rendered = _render([{**m, "content": s} for m, s in zip(messages, sentinels)], tokenizer)
    places = [rendered.find(s) for s in sentinels]
    if any(p < 0 or rendered.count(s) != 1 for p, s in zip(places, sentinels)) or places != sorted(places):
        return None
    pieces, spans, cursor, shift = [], [], 0, 0
    eos = tokenizer.eos_token or ""
    for index, (message, sentinel, place) in enumerate(zip(messages, sentinels, places)):
        pieces += [rendered[cursor:place], message["content"]]
        start = place + shift
        shift += len(message["content"]) - len(sentinel)
        cursor = place + len(sentinel)
        if message["role"] != "assistant" or (only_last and index != len(messages) - 1):
            continue
        turn_end = places[index + 1] if index + 1 < len(messages) else len(rendered)
        end_of_turn = rendered.find(eos, cursor, turn_end) if eos else -1
        if end_of_turn < 0:
            return None
        spans.append((start, end_of_turn + len(eos) + shift))
    return "".join(pieces) + rendered[cursor:], spans


_TEMPLATE_CHECKS = 32  # conversations per tokenizer rendered both ways before the one-render path is trusted


def assistant_spans(tokenizer, messages: list[dict], only_last: bool = False, tools: list[dict] | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant replies, each covering the reply
    and its end-of-turn token. Defined by rendering prefixes with the tokenizer's own chat template (so
    no template or marker is spelled out here), which costs 1 + 2 renders per reply; the same spans come
    from one render with sentinels in place of the contents, used once the first conversations of this
    tokenizer gave identical results both ways (any difference: prefixes from then on)."""
    checks = getattr(tokenizer, "_minimind_template_checks", 0)
    fast = _spans_by_sentinels(tokenizer, messages, only_last) if checks >= 0 and not tools else None
    if fast is not None and checks >= _TEMPLATE_CHECKS:
        return fast
    slow = _spans_by_prefixes(tokenizer, messages, only_last, tools)
    if fast is not None:
        tokenizer._minimind_template_checks = checks + 1 if fast == slow else -1
    return slow


def _supervised(encoding, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens of a `tokenizers.Encoding` lie inside a span (and cover at least one character)."""
    offsets = np.fromiter(chain.from_iterable(encoding.offsets), dtype=np.int64, count=2 * len(encoding)).reshape(-1, 2)
    inside = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        inside |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end)
    return inside & (offsets[:, 1] > offsets[:, 0])


def in_style(messages: list[dict], markers: Markers) -> list[dict]:
    """Replies with reasoning written the way the tokenizer's style writes them: `reasoning_content` (or
    an inline think block) as minimind-3's template takes it, or folded into MiniMind2's <think>/<answer>
    content. Messages without reasoning are left as they are."""
    styled = []
    for message in messages:
        reasoning, answer = message.get("reasoning_content"), message["content"]
        if message["role"] == "assistant" and reasoning is None and not markers.has_answer_tags:
            reasoning, answer = markers.split_reply(answer)  # e.g. a MiniMind2 reasoning reply, for minimind-3
        calls = {"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {}
        if message["role"] != "assistant" or reasoning is None:
            styled.append({"role": message["role"], "content": message["content"], **calls})
        elif markers.has_answer_tags:
            styled.append({"role": "assistant", "content": markers.reply_text(reasoning, answer), **calls})
        else:
            styled.append({"role": "assistant", "content": answer, "reasoning_content": reasoning, **calls})
    return styled


def encode_conversations(
    tokenizer, conversations: list[list[dict]], only_last: bool = False, tools: list[list[dict] | None] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, supervised) arrays per conversation, one tokenizer call for all: supervised marks the
    tokens of assistant replies, tool calls included (tool results are not). `tools`: each conversation's
    tool definitions, if any. (The fast tokenizer's own backend, as `tokenizer(...)` calls it.)"""
    markers = Markers.of(tokenizer)
    tools = tools or [None] * len(conversations)
    rendered = [
        assistant_spans(tokenizer, in_style(messages, markers), only_last, conversation_tools)
        for messages, conversation_tools in zip(conversations, tools)
    ]
    if not rendered:
        return []
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [
        (np.asarray(encoding.ids, dtype=np.int64), _supervised(encoding, spans))
        for (_, spans), encoding in zip(rendered, encodings)
    ]


def tokenize_conversations(
    tokenizer, conversations: list[list[dict]], only_last: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation: labels copy the ids inside assistant replies and are -100 elsewhere."""
    return [
        (ids.tolist(), np.where(supervised, ids, IGNORE_INDEX).tolist())
        for ids, supervised in encode_conversations(tokenizer, conversations, only_last)
    ]


def tag_mask(ids: np.ndarray, sequences: list[list[int]]) -> np.ndarray:
    """True at every position inside an occurrence of one of `sequences` (the tags, each one token or
    several: a tag spelled `<`,`th`,`ink`,`>` marks those four positions, not every `<` of the text)."""
    mask = np.zeros(len(ids), dtype=bool)
    for sequence in sequences:
        width = len(sequence)
        if not 0 < width <= len(ids):
            continue
        starts = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids, width) == np.asarray(sequence)).all(axis=1))
        for offset in range(width):
            mask[starts + offset] = True
    return mask


def tag_weights(ids: np.ndarray, supervised: np.ndarray, tag_sequences: list[list[int]], tag_weight: float) -> np.ndarray:
    """Loss weight per token: `tag_weight` on supervised tag tokens, 1 on other supervised tokens, 0 elsewhere."""
    return np.where(tag_mask(np.asarray(ids), tag_sequences), tag_weight, 1.0) * np.asarray(supervised, dtype=bool)


def expand_image_placeholders(input_ids: list[int], labels: list[int], image_id: int, tokens_per_image: int):
    """Each image placeholder becomes `tokens_per_image` copies (never supervised)."""
    ids, new_labels = [], []
    for token, label in zip(input_ids, labels):
        copies = tokens_per_image if token == image_id else 1
        ids += [token] * copies
        new_labels += [IGNORE_INDEX if token == image_id else label] * copies
    return ids, new_labels


@dataclass
class StageData:
    """How one stage turns records into training rows."""

    kind: str
    seq_len: int = 512
    tag_weight: float = 10.0  # reason: loss weight of <think>/</think>/<answer>/</answer>
    image_tokens: int = 1  # vlm: placeholder tokens per image (196 for CLIP ViT-B/16 at 224 px)

    def marker_ids(self, tokenizer) -> dict:
        """The marker ids this stage needs, looked up once per tokenizer rather than once per record."""
        markers = Markers.of(tokenizer)
        return {
            "image_marker": markers.image,
            "image_id": markers.image_id(tokenizer) if self.kind == "vlm" else None,
            "tag_sequences": markers.tag_sequences(tokenizer) if self.kind == "reason" else [],
        }


def stage_arrays(records: list[dict], stage: StageData, tokenizer, marker_ids: dict) -> list[dict]:
    """Validated records -> training rows of `stage` as arrays (`input_ids`, `supervised`, per side for
    DPO), tokenized in one call: what prepared shards store."""
    if stage.kind == "dpo":
        sides = {
            side: encode_conversations(tokenizer, [record[side] for record in records], True, [r.get("tools") for r in records])
            for side in ("chosen", "rejected")
        }
        rows = []
        for index in range(len(records)):
            row, truncated = {}, False
            for side, encoded in sides.items():
                ids, supervised = encoded[index]
                row[f"{side}_input_ids"], row[f"{side}_supervised"] = ids[: stage.seq_len], supervised[: stage.seq_len]
                truncated = truncated or len(ids) > stage.seq_len
            rows.append({**row, "truncated": truncated})
        return rows
    conversations = [record["conversations"] for record in records]
    tools = [record.get("tools") for record in records]
    if stage.kind == "vlm" and marker_ids["image_marker"] != IMAGE_MARKER:
        conversations = [
            [{**m, "content": m["content"].replace(IMAGE_MARKER, marker_ids["image_marker"])} for m in messages]
            for messages in conversations
        ]
    return [
        _chat_row(record, ids, supervised, stage, marker_ids)
        for record, (ids, supervised) in zip(records, encode_conversations(tokenizer, conversations, False, tools))
    ]


def _chat_row(record: dict, ids: np.ndarray, supervised: np.ndarray, stage: StageData, marker_ids: dict) -> dict:
    row = {}
    length = stage.seq_len
    if stage.kind == "vlm":  # each placeholder becomes image_tokens copies, never supervised
        is_image = ids == marker_ids["image_id"]
        copies = np.where(is_image, stage.image_tokens, 1)
        ids, supervised = np.repeat(ids, copies), np.repeat(supervised & ~is_image, copies)
        places = np.flatnonzero(ids == marker_ids["image_id"])
        images, partial = divmod(int((places < length).sum()), stage.image_tokens)
        if partial:  # never cut through an image: end the row before the image the cut would split
            length = int(places[images * stage.image_tokens])
        row["images"] = record["images"][:images]
    row["input_ids"], row["supervised"] = ids[:length], supervised[:length]
    row["truncated"] = len(ids) > length  # cut at seq_len: its tail was never seen
    return row


def stage_rows(records: list[dict], stage: StageData, tokenizer, marker_ids: dict) -> list[dict]:
    """Validated records -> training rows of `stage` as lists: ids, labels (-100 where no loss is
    wanted), a reasoning stage's loss weights, a VLM's image names."""
    rows = []
    for arrays in stage_arrays(records, stage, tokenizer, marker_ids):
        row = {}
        for key, value in arrays.items():
            if key.endswith("supervised"):
                side = key[: -len("supervised")]
                row[side + "labels"] = np.where(value, arrays[side + "input_ids"], IGNORE_INDEX).tolist()
            elif key.endswith("input_ids"):
                row[key] = value.tolist()
            else:
                row[key] = value
        if stage.kind == "reason":
            row["loss_weights"] = tag_weights(
                arrays["input_ids"], arrays["supervised"], marker_ids["tag_sequences"], stage.tag_weight
            ).tolist()
        rows.append(row)
    return rows


def stage_row(record: dict, stage: StageData, tokenizer, marker_ids: dict) -> dict:
    """One validated record -> one training row of `stage` (a module-level function so `datasets` can
    fingerprint and cache the map that applies it)."""
    return stage_rows([record], stage, tokenizer, marker_ids)[0]


def encode_documents(batch: dict, tokenizer) -> dict:
    """Pretraining text -> ids, each document wrapped in <s> ... </s>."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return {"input_ids": tokenizer([bos + text + eos for text in batch["text"]], add_special_tokens=False)["input_ids"]}


def has_labels(row: dict) -> bool:
    keys = [key for key in row if key.endswith("labels")]
    return all(any(label != IGNORE_INDEX for label in row[key]) for key in keys)


def pack_documents(documents, seq_len: int, pad_id: int) -> Iterator[dict]:
    """Concatenate token lists into rows of exactly `seq_len`; a document may continue on the next row.
    Only the very last row can be short: it is padded and its `length` says how much is real."""
    buffer: list[int] = []
    for document in documents:
        buffer.extend(document)
        while len(buffer) >= seq_len:
            yield {"input_ids": buffer[:seq_len], "length": seq_len}
            buffer = buffer[seq_len:]
    if buffer:
        yield {"input_ids": buffer + [pad_id] * (seq_len - len(buffer)), "length": len(buffer)}


def _packed_rows(tokenized, seq_len: int, pad_id: int):
    yield from pack_documents((row["input_ids"] for row in tokenized), seq_len, pad_id)


def load_stage_dataset(
    path: str | Path,
    tokenizer,
    stage: StageData,
    skip_bad: bool = False,
    num_proc: int | None = None,
    drop_unlabelled: bool = True,
):
    """Read, validate, tokenize (and for pretraining, pack) a JSONL file into a `datasets.Dataset`. Chat
    rows say whether `seq_len` cut them (`truncated`); rows whose cut left nothing supervised are
    dropped unless `drop_unlabelled=False`."""
    from datasets import Dataset

    records = read_jsonl_dataset(path, stage.kind, skip_bad)
    if stage.kind == "pretrain":
        tokenized = records.map(
            encode_documents,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=records.column_names,
            num_proc=num_proc,
        )
        return Dataset.from_generator(
            _packed_rows, gen_kwargs={"tokenized": tokenized, "seq_len": stage.seq_len, "pad_id": tokenizer.pad_token_id}
        )
    rows = records.map(
        stage_row,
        fn_kwargs={"stage": stage, "tokenizer": tokenizer, "marker_ids": stage.marker_ids(tokenizer)},
        remove_columns=records.column_names,
        num_proc=num_proc,
    )
    return rows.filter(has_labels, num_proc=num_proc) if drop_unlabelled else rows  # a cut can remove every supervised token


# --------------------------------------------------------------------------- batching


def row_lengths(dataset) -> list[int]:
    column = "chosen_input_ids" if "chosen_input_ids" in dataset.column_names else "input_ids"
    if "length" in dataset.column_names:
        return list(dataset["length"])
    return [len(ids) for ids in dataset[column]]


class LengthGroupedBatches:
    """Batches of similar length, in random order: shuffle, cut into mega-batches of
    `batch_size * group` rows, sort each by length, split into batches, shuffle the batches. Padding
    shrinks to the spread within a batch. Rank r of `num_replicas` takes every num_replicas-th batch;
    call `set_epoch` for a new order each epoch."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        group: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.num_replicas, self.rank, self.drop_last, self.epoch = num_replicas, rank, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if (
            getattr(self, "_cached", (None,))[0] != self.epoch
        ):  # an epoch's order is computed once (millions of rows take seconds)
            self._cached = (self.epoch, self._order())
        return self._cached[1]

    def _order(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas  # every rank runs the same number of steps
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def right_pad(rows: list[list], value, length: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows])


def collate(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> dict:
    """Right-pad a list of dataset rows into tensors with attention masks. Packed pretraining rows
    (which have `length`) get labels equal to their ids, -100 on the padding of a short last row.
    `tokens` is the count of real tokens, a plain int."""
    batch: dict = {
        "tokens": 0
    }  # real tokens of every prefix, counted here so the training loop never reads a device tensor for it
    prefixes = ("chosen_", "rejected_") if "chosen_input_ids" in rows[0] else ("",)
    for prefix in prefixes:
        ids = [row[prefix + "input_ids"] for row in rows]
        longest = max(len(x) for x in ids)
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        if "length" in rows[0]:
            real = [row["length"] for row in rows]
            labels = [x[:n] + [IGNORE_INDEX] * (len(x) - n) for x, n in zip(ids, real)]
        else:
            real = [len(x) for x in ids]
            labels = [row[prefix + "labels"] for row in rows]
        batch[prefix + "input_ids"] = right_pad(ids, pad_id, longest)
        batch[prefix + "labels"] = right_pad(labels, IGNORE_INDEX, longest)
        batch[prefix + "attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(real)[:, None]).long()
        batch["tokens"] += sum(real)
        if "loss_weights" in rows[0]:
            batch[prefix + "loss_weights"] = right_pad([row["loss_weights"] for row in rows], 0.0, longest)
    if "images" in rows[0]:
        batch["images"] = [row["images"] for row in rows]
    return batch
