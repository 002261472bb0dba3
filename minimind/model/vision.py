"""MiniMind-V: the language model with eyes, LLaVA-1 style (and minimind-3v's variant).

    image --the tower's image processor--> pixels --vision tower (frozen)--> patch tokens (no CLS), e.g. 196 x 768
          [--average-pooled over the patch grid to `image_tokens`, e.g. 256 -> 64]
          --projection--> image_tokens x hidden
    text  "...<image>..." --tokenizer--> ids with 196 placeholder tokens per image --embed--> hidden
    the projected image tokens overwrite the placeholder embeddings, in order; from there the forward
    is exactly the language model's (so KV-cached generation works unchanged).

The projection is MiniMind-V's one bias-free Linear ("linear"), or minimind-3v's LayerNorm and two-layer
MLP ("mlp"). The tower is CLIP's (MiniMind-V) or any transformers vision model folder, e.g. SigLIP's
(minimind-3v): a vision-only folder, or a full image-text one whose vision half is taken.

A VLM directory is a language-model directory (`load_model` still reads its LLM) plus
`vision.json`, `projection.safetensors` and the vision tower in `vision/` (or a path to it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from minimind import storage
from minimind.model.checkpoint import load_model, save_model
from minimind.model.model import CausalLMOutput, MiniMindForCausalLM, unwrap
from minimind.model.tokenizer import Markers, load_tokenizer

VISION_CONFIG_NAME = "vision.json"
PROJECTION_NAME = "projection.safetensors"
VISION_DIR = "vision"


PROJECTORS = ("linear", "mlp")


@dataclass
class VisionConfig:
    vision_model: str = VISION_DIR  # the vision tower: a folder relative to the VLM directory, or absolute
    image_tokens: int = 196  # tokens per image = placeholders per <image>: every patch, or the patches pooled
    vision_hidden_size: int = 768
    projector: str = "linear"  # one of PROJECTORS

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VisionConfig":
        return cls(**json.loads(Path(path).read_text()))


def load_vision_tower(path: str | Path):
    """A frozen vision tower and its image processor, from a local folder or a hub id: CLIP's, or any
    transformers vision model (the vision half of an image-text folder such as SigLIP's)."""
    import importlib.util

    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    if config.model_type in ("clip", "clip_vision_model"):
        tower = transformers.CLIPVisionModel.from_pretrained(str(path))
        # transformers' default CLIP processor needs torchvision; without it, ask for the Pillow one by name
        # (same preprocessing) instead of having it warn and fall back.
        processor_class = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
        processor = getattr(transformers, processor_class).from_pretrained(str(path))
    else:
        vision_config = getattr(config, "vision_config", None) or config
        tower = transformers.MODEL_MAPPING[type(vision_config)].from_pretrained(str(path))  # e.g. SiglipVisionModel
        processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    tower.requires_grad_(False)
    return tower.eval(), processor


def image_token_count(tower) -> int:
    """Patch tokens per image (a CLS token, where the tower has one, is dropped)."""
    config = tower.config
    return (config.image_size // config.patch_size) ** 2


def make_projection(kind: str, vision_hidden_size: int, hidden_size: int) -> nn.Module:
    if kind == "linear":  # MiniMind-V, LLaVA-1
        return nn.Linear(vision_hidden_size, hidden_size, bias=False)
    if kind == "mlp":  # minimind-3v
        return nn.Sequential(
            nn.LayerNorm(vision_hidden_size),
            nn.Linear(vision_hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )
    raise ValueError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}")


def pooled_grid(patches: int, image_tokens: int) -> int:
    """The side of the square grid the patches are pooled to; raises when `image_tokens` cannot be one."""
    side, grid = math.isqrt(image_tokens), math.isqrt(patches)
    if side * side != image_tokens or grid * grid != patches or not 0 < image_tokens <= patches:
        raise ValueError(
            f"{image_tokens} image tokens: the tower's {patches} patches pool to a square grid of at most {patches} tokens "
            "(e.g. 64 = 8 x 8)"
        )
    return side


class MiniMindVLM(nn.Module):
    def __init__(self, language_model: MiniMindForCausalLM, vision_tower, image_processor, image_token_id: int,
                 projector: str = "linear", image_tokens: int | None = None):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.patches = image_token_count(vision_tower)
        self.image_tokens = image_tokens or self.patches
        self.pooled_side = pooled_grid(self.patches, self.image_tokens) if self.image_tokens != self.patches else None
        self.vision_source: str | None = None  # where the tower was loaded from (a folder or hub id), if known
        self.projector = projector
        self.projection = make_projection(projector, vision_tower.config.hidden_size, language_model.config.hidden_size)

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
        """(images, 3, H, W) -> (images, image_tokens, hidden): frozen patch tokens, pooled, projected."""
        projection = next(self.projection.parameters())
        with torch.no_grad():
            tower_dtype = next(self.vision_tower.parameters()).dtype
            patches = self.vision_tower(
                pixel_values=pixel_values.to(projection.device, tower_dtype)
            ).last_hidden_state[:, -self.patches :]  # after the CLS token, where there is one
            if self.pooled_side:  # (images, patches, width) on its grid -> averaged down to image_tokens
                images, _, width = patches.shape
                grid = patches.transpose(1, 2).reshape(images, width, math.isqrt(self.patches), -1)
                patches = F.adaptive_avg_pool2d(grid, self.pooled_side).flatten(2).transpose(1, 2)
        return self.projection(patches.to(projection.dtype))

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
            trained = [p for p in self.projection.parameters() if p.requires_grad]
            if trained and torch.is_grad_enabled():
                # a text-only batch still puts the projection in the graph (with a zero gradient):
                # DDP without find_unused_parameters fails on the next step if a trained parameter sat out
                embeddings = embeddings + 0.0 * sum(p.sum() for p in trained).to(embeddings.dtype)
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
        return self.language_model.num_parameters(active) + sum(p.numel() for p in self.projection.parameters())

    def train_language_model(self, which: str) -> None:
        """Which of the language model trains: "none", "all", or "first-last" (its first and last blocks:
        minimind-3v's rule). The projection always trains; the tower never."""
        blocks = self.language_model.model.layers
        self.language_model.requires_grad_(which == "all")
        if which == "first-last":
            blocks[0].requires_grad_(True)
            blocks[-1].requires_grad_(True)
        elif which not in ("none", "all"):
            raise ValueError(f"unknown rule {which!r} for the language model: none, all or first-last")


def build_vlm(language_model_dir: str | Path, vision_model: str | Path, seed: int = 0, projector: str = "linear",
              image_tokens: int | None = None) -> tuple[MiniMindVLM, object]:
    """A fresh VLM: a trained language model, a vision tower, and a new projection. Returns (vlm, tokenizer)."""
    tokenizer = load_tokenizer(language_model_dir)
    tower, processor = load_vision_tower(vision_model)
    image_token_id = Markers.of(tokenizer).image_id(tokenizer)
    torch.manual_seed(seed)
    vlm = MiniMindVLM(load_model(language_model_dir), tower, processor, image_token_id, projector, image_tokens)
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
    projection = {name: value.detach().cpu().contiguous() for name, value in vlm.projection.state_dict().items()}
    save_file(projection, str(directory / PROJECTION_NAME))
    if vision_model is None:
        vlm.vision_tower.save_pretrained(str(directory / VISION_DIR))
        vlm.image_processor.save_pretrained(str(directory / VISION_DIR))
    reference = _tower_reference(vision_model) if vision_model is not None else VISION_DIR
    VisionConfig(reference, vlm.image_tokens, vlm.vision_tower.config.hidden_size, vlm.projector).save(
        directory / VISION_CONFIG_NAME
    )
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
    image_id = Markers.of(tokenizer).image_id(tokenizer)
    try:
        vlm = MiniMindVLM(load_model(directory), tower, processor, image_id, config.projector, config.image_tokens)
    except ValueError as error:
        raise ValueError(f"{directory}: {VISION_CONFIG_NAME} does not fit its vision tower: {error}") from None
    vlm.vision_source = vision_source
    vlm.projection.load_state_dict(load_file(str(directory / PROJECTION_NAME)))
    return vlm.to(device=device, dtype=dtype).eval()
