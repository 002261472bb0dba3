"""Contrastive pretraining of a small CLIP (Radford et al. 2021, arXiv:2103.00020) on image-caption pairs,
so that MiniMind-V's frozen vision tower has seen pictures with words before the VLM stages use it.

    image --processor--> pixels --CLIPVisionModel--> CLS --visual_projection--> unit vector
    caption --tokenizer + eos--> ids --CLIPTextModel (causal)--> the eos token's state --text_projection--> unit vector
    loss: symmetric InfoNCE over the batch, logits scaled by a learned temperature (CLIP's logit_scale)

The text side is a small transformer over the project's own tokenizer; only the vision tower is kept
(`save_tower`: `CLIPVisionModel.save_pretrained` + the image processor), and `minimind.model.vision` loads it
like real CLIP weights. Pure torch + transformers: the Ray job is minimind.driver.clip_runner.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minimind.data.images import load_image
from minimind.data.rows import iter_jsonl
from minimind.model.model import unwrap
from minimind.model.vision import load_vision_tower

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps its temperature so logits never exceed 100


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(image name, caption) of each one-image record of a MiniMind-V pretrain JSONL: the caption is the
    last assistant reply. Text-only and several-image records are left out."""
    pairs = []
    for _, record in iter_jsonl(path, "vlm"):
        replies = [message["content"] for message in record["conversations"] if message["role"] == "assistant"]
        if len(record["images"]) == 1 and replies:
            pairs.append((record["images"][0], replies[-1]))
    return pairs


def caption_groups(captions: list[str]) -> torch.Tensor:
    """An id per caption, equal for equal texts: pairs that share a caption are each other's positives."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(caption, len(ids)) for caption in captions])


def encode_captions(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), right-padded: each caption cut to `max_len - 1` tokens and closed by eos,
    the token whose state stands for the caption (see `text_embeddings`)."""
    rows = [ids[: max_len - 1] + [tokenizer.eos_token_id] for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


def pixels(processor, images_dir: str | Path, names: list[str]) -> torch.Tensor:
    return processor(images=[load_image(Path(images_dir) / name) for name in names], return_tensors="pt")["pixel_values"]


def new_clip(tower_dir: str | Path, tokenizer, max_text_len: int = 64, text_width: int = 128, text_layers: int = 2,
             projection_dim: int = 128, seed: int = 0):
    """A `transformers.CLIPModel` whose vision side is the tower in `tower_dir` (weights and config) and
    whose text side is a new small encoder over `tokenizer`. Returns (model, the tower's image processor)."""
    from transformers import CLIPConfig, CLIPModel

    tower, processor = load_vision_tower(tower_dir)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 32),
                       max_position_embeddings=max_text_len, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=tower.config.to_dict(), projection_dim=projection_dim))
    clip.vision_model.load_state_dict(tower.state_dict())
    return clip, processor


def image_embeddings(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit vectors from the tower's CLS token (after its post-layernorm), as CLIP pools."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(clip.visual_projection(pooled), dim=-1)


def text_embeddings(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit vectors from each caption's last real token, its eos. Not `CLIPTextModel`'s pooler_output:
    with `eos_token_id == 2` (our tokenizer's) transformers keeps CLIP's original pooling at the
    highest token id (`input_ids.argmax(-1)`), which is a random character here, not the eos."""
    hidden = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(-1) - 1
    return F.normalize(clip.text_projection(hidden[torch.arange(len(hidden), device=hidden.device), last]), dim=-1)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy of each image over the batch's captions and of each caption
    over its images, logits = exp(logit_scale) * cosine similarity, averaged over both directions. With
    `groups`, pairs of the same group (equal captions) are all positives, weighted equally, instead of
    one caption counting as the wrong answer for an image it describes exactly."""
    logits = logit_scale.exp() * image_embeds @ text_embeds.T
    if groups is None:
        targets = torch.arange(len(logits), device=logits.device)
    else:
        same = (groups[:, None] == groups[None, :]).to(logits.dtype)
        targets = same / same.sum(-1, keepdim=True)  # symmetric groups: the same rows serve both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """The learning rate of 1-based `step`: linear warmup to `peak`, then cosine down to `floor * peak`.
    The warmup matters here: at full rate from the first step, the small towers collapse to one
    embedding for every input (loss stuck at log(batch)) and never recover."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(clip, optimizer, pixel_values, input_ids, attention_mask, groups=None) -> float:
    loss = contrastive_loss(image_embeddings(clip, pixel_values), text_embeddings(clip, input_ids, attention_mask),
                            unwrap(clip).logit_scale, groups)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        unwrap(clip).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.item()


@torch.no_grad()
def retrieval(clip, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              groups: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Image -> caption retrieval among the given pairs' captions: the share of images whose most similar
    caption (top-1), or one of the five most similar (top-5), is their own caption's text. Chance is
    about 1 / (distinct captions)."""
    clip = unwrap(clip)
    was_training = clip.training
    clip.eval()
    images = torch.cat(
        [image_embeddings(clip, pixel_values[i : i + batch_size]) for i in range(0, len(pixel_values), batch_size)]
    )
    texts = torch.cat(
        [
            text_embeddings(clip, input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            for i in range(0, len(input_ids), batch_size)
        ]
    )
    clip.train(was_training)
    ranked = (images @ texts.T).topk(min(5, len(texts)), dim=-1).indices
    hits = groups[ranked] == groups[:, None]
    return {
        "top1": hits[:, 0].float().mean().item(),
        "top5": hits.any(-1).float().mean().item(),
        "chance": 1 / len(groups.unique()),
    }


def save_tower(clip, processor, folder: str | Path) -> Path:
    """Only the vision tower, exactly as the demo's random tower is saved: `minimind.model.vision.load_vision_tower`
    and `build_vlm` read the folder like real CLIP weights."""
    folder = Path(folder)
    unwrap(clip).vision_model.save_pretrained(str(folder))  # a CLIPVisionModel of its own
    processor.save_pretrained(str(folder))
    return folder
