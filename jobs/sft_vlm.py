"""MiniMind-V stage 2, visual instruction tuning: the projection and the language model train; the
vision tower stays frozen.

    python jobs/sft_vlm.py                            # demo images; starts from models:/minimind-vlm-pretrain/latest
    python jobs/sft_vlm.py --data sft_vlm_data.jsonl --images sft_images/ --seq-len 1536 --lr 2e-6

Registers `minimind-vlm-sft`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("vlm_sft", description=__doc__)
