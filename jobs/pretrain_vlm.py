"""MiniMind-V stage 1, feature alignment: only the projection from CLIP features to the LLM trains;
the vision tower and the language model stay frozen.

    python jobs/pretrain_vlm.py                       # demo images; starts from models:/minimind-sft/latest
    python jobs/pretrain_vlm.py --data pretrain_vlm_data.jsonl --images pretrain_images/ \\
        --vision-model /models/clip-vit-base-patch16 --seq-len 640 --lr 4e-4

Without --vision-model the demo's small random CLIP tower is used (no weights are downloaded unless you
name a hub id such as openai/clip-vit-base-patch16). Registers `minimind-vlm-pretrain`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("vlm_pretrain", description=__doc__)
