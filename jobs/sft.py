"""Supervised fine-tuning: cross-entropy on the assistant replies only.

    python jobs/sft.py                                         # starts from models:/minimind-pretrain/latest
    python jobs/sft.py --data sft_mini_512.jsonl --seq-len 512 --lr 5e-6 --init models:/minimind-pretrain/3
    ray job submit --working-dir . -- python jobs/sft.py

Registers `minimind-sft`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("sft", description=__doc__)
