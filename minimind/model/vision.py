"""MiniMind-V: the language model with eyes, LLaVA-1 style.

    image --CLIPImageProcessor--> pixels --CLIP ViT (frozen)--> patch tokens (no CLS), e.g. 196 x 768
          --projection (one bias-free Linear)--> 196 x hidden
    text  "...<image>..." --tokenizer--> ids with 196 placeholder tokens per image --embed--> hidden
    the projected image tokens overwrite the placeholder embeddings, in order; from there the forward
    is exactly the language model's (so KV-cached generation works unchanged).

A VLM directory is a language-model directory (`load_model` still reads its LLM) plus
`vision.json`, `projection.safetensors` and the CLIP tower in `vision/` (or a path to it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from minimind import storage
from minimind.model.checkpoint import load_model, save_model
from minimind.model.model import CausalLMOutput, MiniMindForCausalLM, unwrap
from minimind.model.tokenizer import Markers, load_tokenizer

VISION_CONFIG_NAME = "vision.json"
PROJECTION_NAME = "projection.safetensors"
VISION_DIR = "vision"


@dataclass
class VisionConfig:
    vision_model: str = VISION_DIR  # the CLIP tower: a folder relative to the VLM directory, or absolute
    image_tokens: int = 196  # patch tokens per image = placeholders per <image>
    vision_hidden_size: int = 768

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VisionConfig":
        return cls(**json.loads(Path(path).read_text()))


def load_vision_tower(path: str | Path):
    """A frozen CLIP vision tower and its image processor, from a local folder or a hub id."""
    import importlib.util

    import transformers

    tower = transformers.CLIPVisionModel.from_pretrained(str(path))
    tower.requires_grad_(False)
    # transformers' default CLIP processor needs torchvision; without it, ask for the Pillow one by name
    # (same preprocessing) instead of having it warn and fall back.
    processor_class = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
    return tower.eval(), getattr(transformers, processor_class).from_pretrained(str(path))


def image_token_count(tower) -> int:
    config = tower.config
    return (config.image_size // config.patch_size) ** 2  # the CLS token is dropped


class MiniMindVLM(nn.Module):
    def __init__(self, language_model: MiniMindForCausalLM, vision_tower, image_processor, image_token_id: int):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_tokens = image_token_count(vision_tower)
        self.vision_source: str | None = None  # where the tower was loaded from (a folder or hub id), if known
        self.projection = nn.Linear(vision_tower.config.hidden_size, language_model.config.hidden_size, bias=False)

    @property
    def config(self):  # generation and the training loop read the language model's config
        return self.language_model.config

    @property
    def lm_head(self):
        return self.language_model.lm_head

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()  # always frozen, always in eval mode
        return self

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, image_tokens, hidden): frozen patch tokens, projected."""
        with torch.no_grad():
            tower_dtype = next(self.vision_tower.parameters()).dtype
            patches = self.vision_tower(
                pixel_values=pixel_values.to(self.projection.weight.device, tower_dtype)
            ).last_hidden_state[:, 1:]
        return self.projection(patches.to(self.projection.weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written over the placeholder positions: the k-th run
        of `image_tokens` placeholders in the batch (row by row) receives the k-th image."""
        embeddings = self.language_model.model.embed_tokens(input_ids)
        is_placeholder = input_ids == self.image_token_id
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if input_ids.is_cuda:  # checked on the device: reading the count would make the host wait for the GPU
            torch._assert_async(
                is_placeholder.sum() == images * self.image_tokens,
                f"the image placeholder tokens are not {images} image(s) of {self.image_tokens} tokens each",
            )
        elif (count := int(is_placeholder.sum())) != images * self.image_tokens:
            raise ValueError(f"{count} image placeholder tokens for {images} image(s) of {self.image_tokens} tokens each")
        if images == 0:
            if self.projection.weight.requires_grad and torch.is_grad_enabled():
                # a text-only batch still puts the projection in the graph (with a zero gradient):
                # DDP without find_unused_parameters fails on the next step if a trained parameter sat out
                embeddings = embeddings + 0.0 * self.projection.weight.sum().to(embeddings.dtype)
            return embeddings
        features = self.image_features(pixel_values).reshape(-1, embeddings.shape[-1]).to(embeddings.dtype)
        return embeddings.masked_scatter(is_placeholder[..., None], features)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, pixel_values=None, kv_cache=None, **kwargs
    ) -> CausalLMOutput:
        """The language model's forward; `pixel_values` (one entry per image, in placeholder order) are
        needed whenever `input_ids` contain placeholders, i.e. at prefill but not for cached decoding."""
        return self.language_model(
            None, attention_mask, inputs_embeds=self.embed(input_ids, pixel_values), kv_cache=kv_cache, **kwargs
        )

    def num_parameters(self, active: bool = False) -> int:
        """Parameters the forward spends FLOPs on in the language model and projection (MFU's basis)."""
        return self.language_model.num_parameters(active) + self.projection.weight.numel()


def build_vlm(language_model_dir: str | Path, vision_model: str | Path, seed: int = 0) -> tuple[MiniMindVLM, object]:
    """A fresh VLM: a trained language model, a CLIP tower, and a new projection. Returns (vlm, tokenizer)."""
    tokenizer = load_tokenizer(language_model_dir)
    tower, processor = load_vision_tower(vision_model)
    image_token_id = Markers.of(tokenizer).image_id(tokenizer)
    torch.manual_seed(seed)
    vlm = MiniMindVLM(load_model(language_model_dir), tower, processor, image_token_id)
    vlm.vision_source = _tower_reference(vision_model)
    return vlm, tokenizer


def _tower_reference(vision_model: str | Path) -> str:
    """An existing folder as its absolute path, anything else (a hub id) as given."""
    return str(Path(vision_model).resolve()) if Path(vision_model).exists() else str(vision_model)


def save_vlm(vlm: MiniMindVLM, directory: str | Path, tokenizer=None, vision_model: str | Path | None = None) -> Path:
    """Write a VLM directory: the language model, the projection, and the CLIP tower copied into
    `vision/`, or with `vision_model` only referenced by that folder or hub id (the tower is frozen, so
    checkpoints and linked models need no copy of their own)."""
    directory = Path(directory)
    vlm = unwrap(vlm)
    save_model(vlm.language_model, directory, tokenizer=tokenizer)
    save_file({"weight": vlm.projection.weight.detach().cpu().contiguous()}, str(directory / PROJECTION_NAME))
    if vision_model is None:
        vlm.vision_tower.save_pretrained(str(directory / VISION_DIR))
        vlm.image_processor.save_pretrained(str(directory / VISION_DIR))
    reference = _tower_reference(vision_model) if vision_model is not None else VISION_DIR
    VisionConfig(reference, vlm.image_tokens, vlm.vision_tower.config.hidden_size).save(directory / VISION_CONFIG_NAME)
    return directory


def copy_vision_tower(directory: str | Path) -> Path:
    """Make a VLM directory that references its tower self-contained: the tower is copied into
    `vision/` and `vision.json` points there. A directory that holds its tower already is left alone."""
    directory = Path(directory)
    config = VisionConfig.load(directory / VISION_CONFIG_NAME)
    if config.vision_model != VISION_DIR:
        tower, processor = load_vision_tower(_locate_tower(directory, config.vision_model)[0])
        tower.save_pretrained(str(directory / VISION_DIR))
        processor.save_pretrained(str(directory / VISION_DIR))
        config.vision_model = VISION_DIR
        config.save(directory / VISION_CONFIG_NAME)
    return directory


def _locate_tower(directory: Path, reference: str) -> tuple[str | Path, str]:
    """Where to load a VLM directory's tower from here, and how its checkpoints should reference it:
    `vision/` inside it, an absolute folder, a storage URI (fetched into this node's cache; the
    reference stays the URI, which every node reaches) or a hub id."""
    if storage.is_uri(reference):
        return storage.fetch(reference), reference
    local = Path(reference) if Path(reference).is_absolute() else directory / reference
    return (local, str(local.resolve())) if local.exists() else (reference, reference)


def is_vlm_dir(directory: str | Path) -> bool:
    return (Path(directory) / VISION_CONFIG_NAME).is_file()


def load_vlm(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MiniMindVLM:
    directory = Path(directory)
    if not is_vlm_dir(directory):
        raise FileNotFoundError(f"{directory} is not a MiniMind-V directory: {VISION_CONFIG_NAME} is missing")
    config = VisionConfig.load(directory / VISION_CONFIG_NAME)
    tower_location, vision_source = _locate_tower(directory, config.vision_model)
    tower, processor = load_vision_tower(tower_location)
    tokenizer = load_tokenizer(directory)
    vlm = MiniMindVLM(load_model(directory), tower, processor, Markers.of(tokenizer).image_id(tokenizer))
    vlm.vision_source = vision_source
    if vlm.image_tokens != config.image_tokens:
        raise ValueError(
            f"{directory}: the vision tower yields {vlm.image_tokens} tokens per image, "
            f"{VISION_CONFIG_NAME} says {config.image_tokens}"
        )
    vlm.projection.load_state_dict(load_file(str(directory / PROJECTION_NAME)))
    return vlm.to(device=device, dtype=dtype).eval()
