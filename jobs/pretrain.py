"""Pretraining: next-token cross-entropy on documents packed into full rows.

    python jobs/pretrain.py                                    # demo world, demo preset, demo tokenizer
    python jobs/pretrain.py --data pretrain_hq.jsonl --preset minimind2-small --tokenizer checkpoints/tokenizer \\
        --seq-len 512 --batch-size 32 --grad-accum 8 --lr 5e-4
    ray job submit --working-dir . -- python jobs/pretrain.py

Registers `minimind-pretrain`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("pretrain", description=__doc__)
