"""Held-out evaluation of each stage, measuring what the stage exists for. Works on the demo world's
`*_eval.jsonl` files or any file in the same format; the jobs log these numbers to MLflow.

    every     heldout_loss          mean next-token cross-entropy on unseen text (replies only for chat data)
    sft       answer_exact_match    greedy reply == reference reply
    dpo       preference_accuracy   chosen reply more likely than rejected (reward = policy - reference)
    reason    reasoning_scores      reply has the <think>/<answer> form; answer == reference answer
    tools     tool_use_scores       the right call when a tool is needed, none when not; the answer from its result
    vlm       image_question_accuracy  reply about the image(s) == reference reply
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minimind.data.images import load_image
from minimind.data.rows import StageData, collate, iter_jsonl
from minimind.data.tools import CALL_START, CallNotParsed, parse_calls
from minimind.inference.chat import Chat, reply_opening
from minimind.inference.generate import generate
from minimind.model.losses import sequence_logprobs
from minimind.model.tokenizer import Markers
from minimind.rl.rewards import reasoning_parts, reference_answer
from minimind.training.heldout import batches_of, device_of, heldout_rows

Replier = Callable[[Sequence[list[dict]]], list[str]]


def text_replier(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 128, whole_reply: bool = False,
                 thinking: bool | None = None, tools: list[dict] | None = None) -> Replier:
    """Greedy replies of a text model to conversations (each ending with a user turn). Batches of 128: a small
    model's decoding step costs about the same for 32 rows as for 128 (the demo's 200 held-out SFT questions: 2.6x faster).
    `whole_reply`: each reply starts with what its prompt wrote of it (minimind-3's think block). `thinking`: the
    prompts open a think block (templates that have one; default: the tokenizer's `open_thinking`). `tools`: listed
    in every prompt."""

    chat = Chat(model, tokenizer)
    opening = reply_opening(tokenizer, thinking) if whole_reply else ""

    def reply(conversations: Sequence[list[dict]]) -> list[str]:
        replies = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            prompts = [chat.prompt_ids(conversation, tools, thinking) for conversation in chunk]
            outputs = generate(model, prompts, chat.sampling(max_new_tokens=max_new_tokens))
            replies += [opening + tokenizer.decode(tokens, skip_special_tokens=False) for tokens in outputs]
        return replies

    return reply


def vlm_replier(vlm, tokenizer, max_new_tokens: int = 64, batch_size: int = 64):
    """Greedy replies of a VLM to (conversation, image paths) queries."""
    chat = Chat(vlm, tokenizer)

    def reply(queries: Sequence[tuple[list[dict], list[Path]]]) -> list[str]:
        replies = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            prompts = [chat.prompt_ids(conversation) for conversation, _ in chunk]
            images = [load_image(path) for _, paths in chunk for path in paths]
            outputs = generate(vlm, prompts, chat.sampling(max_new_tokens=max_new_tokens),
                               prompt_inputs={"pixel_values": chat.pixel_values(images)})
            replies += [tokenizer.decode(tokens, skip_special_tokens=False) for tokens in outputs]
        return replies

    return reply


def _prompts_and_references(path: str | Path, kind: str, limit: int | None):
    records = [record for _, record in iter_jsonl(path, kind)][:limit]
    return [r["conversations"][:-1] for r in records], [r["conversations"][-1]["content"] for r in records]


def record_tasks(path: str | Path, limit: int | None = None) -> list[str | None]:
    """The optional "task" of each record (the demo's held-out files name each row's family), in file order."""
    tasks = []
    with open(path, encoding="utf-8-sig") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                tasks.append(record.get("task") if isinstance(record, dict) and isinstance(record.get("task"), str) else None)
    return tasks[:limit]


def by_task(hits: Sequence[bool], tasks: Sequence[str | None]) -> dict[str, float]:
    """Accuracy within each named task, when the records name more than one."""
    named = sorted({task for task in tasks if task})
    if len(named) < 2:
        return {}
    return {task: sum(h for h, t in zip(hits, tasks) if t == task) / tasks.count(task) for task in named}


def answer_exact_match(replier: Replier, path: str | Path, limit: int | None = None, kind: str = "sft") -> dict:
    """Share of held-out conversations whose reply equals the reference (final assistant turn), overall
    and, in `by_task`, within each family of records that name their "task"."""
    prompts, references = _prompts_and_references(path, kind, limit)
    replies = replier(prompts)
    hits = [reply.strip() == reference.strip() for reply, reference in zip(replies, references)]
    return {"accuracy": sum(hits) / max(len(hits), 1), "by_task": by_task(hits, record_tasks(path, limit)),
            "samples": list(zip(prompts[:5], replies[:5], references[:5]))}


def reasoning_scores(replier: Replier, path: str | Path, tokenizer, limit: int | None = None) -> dict:
    """Format adherence (the whole reply is <think>…</think><answer>…</answer>, each tag exactly once) and
    answer accuracy, overall and, in `by_task`, within each family of records that name their "task"."""
    markers = Markers.of(tokenizer)
    records = [record for _, record in iter_jsonl(path, "reason")][:limit]
    prompts = [r["conversations"][:-1] for r in records]
    replies = replier(prompts)  # whole replies (text_replier's whole_reply)
    well_formed = [reasoning_parts(reply, markers) for reply in replies]
    expected = [reference_answer(r["conversations"][-1], markers) for r in records]
    correct = [bool(got and want is not None and got[1] == want) for got, want in zip(well_formed, expected)]
    count = max(len(replies), 1)
    return {"format": sum(bool(m) for m in well_formed) / count, "accuracy": sum(correct) / count,
            "by_task": by_task(correct, record_tasks(path, limit)), "samples": list(zip(prompts[:5], replies[:5]))}


def replies_with_tools(model, tokenizer, queries: Sequence[tuple[list[dict], list[dict] | None]]) -> list[str]:
    """Greedy replies to (conversation, the tools its prompt lists), in order: one replier per list of tools,
    as written (the prompt lists them in that order)."""
    by_tools: dict[str, list[int]] = {}
    for index, (_, tools) in enumerate(queries):
        by_tools.setdefault(json.dumps(tools), []).append(index)
    replies: list[str] = [""] * len(queries)
    for indices in by_tools.values():
        replier = text_replier(model, tokenizer, tools=queries[indices[0]][1])
        for index, reply in zip(indices, replier([queries[i][0] for i in indices])):
            replies[index] = reply
    return replies


def tool_use_scores(model, tokenizer, path: str | Path, limit: int | None = None) -> dict:
    """Tool use on held-out records in OpenAI's message shape, each listing its tools and naming its "task":
    "call" records (a question, the assistant's call, the tool's result, the answer) score `call` (the reply to
    the question makes exactly the call of the record: the right tool, arguments that parse and are right) and
    `answer` (given the result, the reply is the record's answer); "no_call" records score `no_call` (the reply
    to the question calls no tool)."""
    records = [record for _, record in iter_jsonl(path, "sft")][:limit]
    tasks = record_tasks(path, limit)
    queries = []  # (family, conversation to reply to, its tools, reference: calls or text)
    for record, task in zip(records, tasks):
        conversation, tools = record["conversations"], record.get("tools")
        if task == "call":
            at = next(i for i, message in enumerate(conversation) if message.get("tool_calls"))
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in conversation[at]["tool_calls"]]
            queries.append(("call", conversation[:at], tools, calls))
            queries.append(("answer", conversation[:-1], tools, conversation[-1]["content"]))
        elif task == "no_call":
            queries.append(("no_call", conversation[:-1], tools, None))
    replies = replies_with_tools(model, tokenizer, [(conversation, tools) for _, conversation, tools, _ in queries])

    def hit(family: str, reply: str, reference) -> bool:
        if family == "no_call":
            return CALL_START not in reply
        if family == "answer":
            return reply.strip() == reference.strip()
        try:
            return parse_calls(reply)[1] == reference
        except CallNotParsed:
            return False

    scores = {}
    for family in ("call", "answer", "no_call"):
        hits = [hit(f, reply, reference) for (f, _, _, reference), reply in zip(queries, replies) if f == family]
        scores[family] = sum(hits) / len(hits) if hits else float("nan")
    scores["samples"] = [(conversation, reply) for (_, conversation, _, _), reply in zip(queries[:6], replies)]
    return scores


def image_question_accuracy(replier: Callable[[Sequence[tuple[list[dict], list[Path]]]], list[str]], path: str | Path,
                            images_dir: str | Path, limit: int | None = None) -> dict:
    """Share of held-out image questions answered exactly; the replier gets (conversation, image paths)."""
    records = [record for _, record in iter_jsonl(path, "vlm")][:limit]
    queries = [(r["conversations"][:-1], [Path(images_dir) / name for name in r["images"]]) for r in records]
    references = [r["conversations"][-1]["content"] for r in records]
    replies = replier(queries)
    hits = [reply.strip() == reference.strip() for reply, reference in zip(replies, references)]
    return {"accuracy": sum(hits) / max(len(hits), 1), "by_task": by_task(hits, record_tasks(path, limit)),
            "samples": list(zip(queries[:5], replies[:5], references[:5]))}


@torch.no_grad()
def preference_accuracy(model, tokenizer, path: str | Path, reference_model=None, seq_len: int = 512, batch_size: int = 16,
                        limit: int | None = None) -> dict:
    """How often the chosen reply wins: by implicit DPO reward (policy minus reference mean log-prob)
    when a reference is given, else by the policy's own mean log-prob. Ties are not wins. With a
    reference, `drift` is the mean |policy - reference| per-token log-prob over both replies: how far
    the policy has moved."""
    chosen, rejected = pair_logps(model, tokenizer, path, seq_len, batch_size, limit)
    if reference_model is None:
        return preference_wins(chosen, rejected)
    reference_chosen, reference_rejected = pair_logps(reference_model, tokenizer, path, seq_len, batch_size, limit)
    return preference_wins(chosen - reference_chosen, rejected - reference_rejected, with_drift=True)


@torch.no_grad()
def pair_logps(model, tokenizer, path: str | Path, seq_len: int = 512, batch_size: int = 16,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token log-prob of each held-out pair's chosen and rejected reply under `model`."""
    rows, _ = heldout_rows(path, tokenizer, StageData("dpo", seq_len=seq_len), limit)
    sides: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for rows_batch in batches_of(rows, batch_size):
        batch = collate(rows_batch, tokenizer.pad_token_id)
        for side, scores in sides.items():
            ids, mask, labels = (batch[f"{side}_{key}"].to(device_of(model)) for key in ("input_ids", "attention_mask", "labels"))
            scores.append(_mean_logps(model, ids, mask, labels).float().cpu())
    return tuple(torch.cat(scores) if scores else torch.zeros(0) for scores in sides.values())


def preference_wins(chosen: torch.Tensor, rejected: torch.Tensor, with_drift: bool = False) -> dict:
    """Accuracy and mean margin of chosen over rejected scores; with_drift: they are log-ratios to a reference."""
    count = max(len(chosen), 1)
    result = {"accuracy": float((chosen > rejected).sum()) / count, "margin": float((chosen - rejected).sum()) / count}
    if with_drift:
        result["drift"] = float(torch.cat([chosen, rejected]).abs().sum()) / max(2 * len(chosen), 1)
    return result


def _mean_logps(model, ids, mask, labels):
    model.eval()
    hidden = model(ids, mask, return_logits=False).hidden_states
    return sequence_logprobs(hidden, model.lm_head.weight, labels)
