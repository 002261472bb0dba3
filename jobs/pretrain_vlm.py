"""MiniMind-V stage 1, feature alignment: only the projection from CLIP features to the LLM trains;
the vision tower and the language model stay frozen.

    python jobs/pretrain_vlm.py                       # demo images; starts from models:/minimind-sft/latest
    python jobs/pretrain_vlm.py --data pretrain_vlm_data.jsonl --images pretrain_images/ \\
        --vision-model /models/clip-vit-base-patch16 --seq-len 640 --lr 4e-4

Without --vision-model the demo's small random CLIP tower is used (no weights are downloaded unless you
name a hub id such as openai/clip-vit-base-patch16). Registers `minimind-vlm-pretrain`.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.runner import main  # noqa: E402
from minimind.train import TrainConfig  # noqa: E402


@dataclass
class VLMConfig(TrainConfig):
    images: str | None = field(default=None, metadata={"help": "folder the JSONL's image names are relative to (default: the demo images, or the data file's folder)"})
    vision_model: str | None = field(default=None, metadata={"help": "CLIP vision tower: a local folder or hub id, used when --init is a language model (default: the demo tower)"})
    link_vision: bool = field(default=False, metadata={"help": "reference the vision tower by its path instead of copying it into the model directory"})
    lr: float = 1e-3
    epochs: int = 1


if __name__ == "__main__":
    main(VLMConfig, "vlm_pretrain", description=__doc__)
