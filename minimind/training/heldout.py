"""The held-out loss of a stage's own rows: the training loop's `val/loss` and every stage's
`eval/heldout_loss`."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.data.pixels import batch_pixel_values
from minimind.data.rows import StageData, collate, has_labels, load_stage_dataset
from minimind.model.losses import causal_lm_loss


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def batches_of(rows, batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield [rows[i] for i in range(start, min(start + batch_size, len(rows)))]


def heldout_rows(path: str | Path, tokenizer, stage_data: StageData, limit: int | None = None):
    """The first `limit` held-out rows of a stage at its own `seq_len`, and what that length did to them:
    {"rows": evaluated, "cut": rows cut short, "dropped": rows whose cut left nothing to score}."""
    rows = load_stage_dataset(path, tokenizer, stage_data, drop_unlabelled=False)
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    cut = sum(rows["truncated"]) if "truncated" in rows.column_names else 0  # packed pretraining text is never cut
    kept = rows.filter(has_labels)
    return kept, {"rows": len(kept), "cut": int(cut), "dropped": len(rows) - len(kept)}


@torch.no_grad()
def heldout_loss(model, tokenizer, path: str | Path, kind: str = "pretrain", seq_len: int = 256, batch_size: int = 16,
                 limit: int | None = None, images_dir: str | Path | None = None) -> float:
    """Mean cross-entropy per predicted token: every token of packed text for `pretrain`, the assistant
    replies (unweighted) for the chat kinds `sft`, `reason` and `vlm` (a VLM with its images). Rows are
    cut at `seq_len` as in training, so this is the training loop's `val/loss`."""
    stage_data = StageData(kind, seq_len=seq_len, image_tokens=getattr(model, "image_tokens", 1))
    rows, _ = heldout_rows(path, tokenizer, stage_data, limit)
    total, tokens = 0.0, 0
    model.eval()
    for rows_batch in batches_of(rows, batch_size):
        batch = collate(rows_batch, tokenizer.pad_token_id)
        labels = batch["labels"].to(device_of(model))
        images = {"pixel_values": batch_pixel_values(model, batch["images"], images_dir)} if kind == "vlm" else {}
        hidden = model(batch["input_ids"].to(device_of(model)), return_logits=False, **images).hidden_states
        loss = causal_lm_loss(hidden, model.lm_head.weight, labels)  # without the MoE aux term
        counted = int((labels[:, 1:] != -100).sum())
        total, tokens = total + float(loss) * counted, tokens + counted
    return total / max(tokens, 1)
