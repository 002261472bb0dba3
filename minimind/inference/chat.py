"""A chat model: the one way every user of a model folder (the CLI, Serve, the MLflow pyfunc model and
the held-out evaluation) loads it and turns messages into prompt ids, pictures into pixels, and
sampling settings into ones that stop at the end of the reply and never sample an image placeholder.

    chat = Chat.load("checkpoints/sft")               # a model folder (text or MiniMind-V)
    ids = chat.prompt_ids([{"role": "user", "content": "你好"}])
    generate(chat.model, [ids], chat.sampling(max_new_tokens=64))

A `models:/` URI or a LoRA adapter folder is resolved to a model folder by minimind.tracking first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from minimind.data.rows import IMAGE_MARKER, expand_image_placeholders
from minimind.inference.generate import inference_dtype
from minimind.inference.sampling import SamplingParams
from minimind.model.checkpoint import load_model
from minimind.model.tokenizer import Markers, load_tokenizer, opens_thinking
from minimind.model.vision import MiniMindVLM, is_vlm_dir, load_vlm


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, thinking: bool | None = None
                    ) -> list[int]:
    """Messages (ending with the user's or a tool's turn) through the tokenizer's chat template, ready for the
    reply; `tools` listed in the system turn; `thinking` (default: the tokenizer's `open_thinking`) opens a
    think block in templates that have one."""
    thinking = opens_thinking(tokenizer) if thinking is None else thinking
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, open_thinking=thinking))


def prompt_ids(vlm: MiniMindVLM, tokenizer, messages: list[dict], tools: list[dict] | None = None,
               thinking: bool | None = None) -> list[int]:
    """A chat prompt (ending with the user's turn) as ids, each <image> expanded to the tower's token count."""
    marker = Markers.of(tokenizer).image
    if marker != IMAGE_MARKER:
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, marker)} for m in messages]
    ids = chat_prompt_ids(tokenizer, messages, tools, thinking)
    return expand_image_placeholders(ids, ids, vlm.image_token_id, vlm.image_tokens)[0]


def reply_opening(tokenizer, thinking: bool | None = None) -> str:
    """What the generation prompt already wrote of the reply (an opened or an empty think block), which
    belongs in front of the generated text when a reply is parsed."""
    thinking = opens_thinking(tokenizer) if thinking is None else thinking
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False,
                                           open_thinking=thinking)
    return Markers.of(tokenizer).reply_opening(prompt)


@dataclass
class Chat:
    model: torch.nn.Module  # a MiniMindForCausalLM or a MiniMindVLM
    tokenizer: object

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device | None = None, dtype: str = "bf16") -> Chat:
        """A model folder on `device` (default: CUDA when there is one), its weights in bf16 where the device
        computes in it (half the bytes read per decoded token), else fp32; in eval mode."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        load = load_vlm if is_vlm_dir(model_dir) else load_model
        return cls(load(model_dir, device=device, dtype=inference_dtype(dtype, device)).eval(), load_tokenizer(model_dir))

    @property
    def takes_images(self) -> bool:
        return isinstance(self.model, MiniMindVLM)

    @property
    def stop_ids(self) -> list[int]:
        """The end of a reply: the model's and the tokenizer's end-of-text ids (one and the same for ours)."""
        return sorted({self.model.config.eos_token_id, self.tokenizer.eos_token_id} - {None})

    @property
    def suppressed_ids(self) -> list[int]:
        """Ids never sampled: a VLM's image placeholder (a text model has none)."""
        return [self.model.image_token_id] if self.takes_images else []

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool | None = None) -> list[int]:
        """Messages (ending with the user's or a tool's turn) through the tokenizer's chat template, ready for
        the reply (see `chat_prompt_ids`)."""
        if self.takes_images:
            return prompt_ids(self.model, self.tokenizer, messages, tools, thinking)
        return chat_prompt_ids(self.tokenizer, messages, tools, thinking)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        """The tower's input for a prompt's pictures, in the order of its image markers (None: no picture)."""
        return self.model.pixel_values(images) if images else None

    def sampling(self, **fields) -> SamplingParams:
        """SamplingParams that stop at the end of the reply and never sample a VLM's image placeholder."""
        return SamplingParams(stop_token_ids=self.stop_ids, suppress_token_ids=self.suppressed_ids or None, **fields)
