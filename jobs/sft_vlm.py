"""MiniMind-V stage 2, visual instruction tuning: the projection and the language model train; the
vision tower stays frozen.

    python jobs/sft_vlm.py                            # demo images; starts from models:/minimind-vlm-pretrain/latest
    python jobs/sft_vlm.py --data sft_vlm_data.jsonl --images sft_images/ --seq-len 1536 --lr 2e-6

Registers `minimind-vlm-sft`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.driver.runner import main  # noqa: E402
from minimind.training.configs import VLMSFTConfig  # noqa: E402


if __name__ == "__main__":
    main(VLMSFTConfig, "vlm_sft", description=__doc__)
