"""A VLM batch's pictures: decoded from the images folder (or the bytes prepared Parquet data holds) and turned
into the vision tower's pixels."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from minimind.data.images import load_image
from minimind.model.vision import MiniMindVLM


def batch_pixel_values(vlm: MiniMindVLM, images: list[list[str]], images_dir: str | Path | None) -> torch.Tensor | None:
    """Pixels for every image of a batch, row by row, in placeholder order (None for a text-only batch)."""
    return _pixels(vlm.image_processor, images, images_dir)


def _pixels(image_processor, images: list[list[str | bytes]], images_dir) -> torch.Tensor | None:
    """Each image a file name under `images_dir`, or its bytes (prepared Parquet data)."""
    names = [name for row in images for name in row]
    if not names:
        return None
    pictures = [
        load_image(io.BytesIO(name), name="an image of the prepared data") if isinstance(name, bytes)
        else load_image(Path(images_dir or ".") / name)
        for name in names
    ]
    return image_processor(images=pictures, return_tensors="pt")["pixel_values"]


class BatchWithPixels:
    """A collate function that also decodes and resizes the batch's images (in a DataLoader process,
    off the training thread): the batch gets `pixel_values`, or none when it holds no image."""

    def __init__(self, collate_fn, image_processor, images_dir):
        self.collate_fn, self.image_processor, self.images_dir = collate_fn, image_processor, images_dir

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collate_fn(rows)
        pixels = _pixels(self.image_processor, batch["images"], self.images_dir)
        return {**batch, **({"pixel_values": pixels} if pixels is not None else {})}
