"""Supervised fine-tuning: cross-entropy on the assistant replies only.

    python jobs/sft.py                                         # starts from models:/minimind-pretrain/latest
    python jobs/sft.py --data sft_mini_512.jsonl --seq-len 512 --lr 5e-6 --init models:/minimind-pretrain/3
    ray job submit --working-dir . -- python jobs/sft.py

Registers `minimind-sft`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.driver.runner import main  # noqa: E402
from minimind.training.configs import SFTConfig  # noqa: E402


if __name__ == "__main__":
    main(SFTConfig, "sft", description=__doc__)
