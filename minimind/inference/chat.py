"""A chat model's prompts: messages through the tokenizer's chat template to ids."""

from __future__ import annotations

from minimind.data.rows import IMAGE_MARKER, expand_image_placeholders
from minimind.model.tokenizer import Markers
from minimind.model.vision import MiniMindVLM


def prompt_ids(vlm: MiniMindVLM, tokenizer, messages: list[dict]) -> list[int]:
    """A chat prompt (ending with the user's turn) as ids, each <image> expanded to the tower's token count."""
    marker = Markers.of(tokenizer).image
    if marker != IMAGE_MARKER:
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, marker)} for m in messages]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return expand_image_placeholders(ids, ids, vlm.image_token_id, vlm.image_tokens)[0]
