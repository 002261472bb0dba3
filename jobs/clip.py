"""Contrastive pretraining of MiniMind-V's vision tower: a small CLIP (the tower + a text encoder over our
tokenizer, symmetric InfoNCE with a learned temperature) as a Ray Train job. Only the tower is kept and
registered, and the VLM stages take it with --vision-model models:/minimind-clip-demo/VERSION.

    python jobs/clip.py                          # the demo world's training pictures of --seed; minimind-clip-demo
    python jobs/clip.py --max-steps 50           # shorter
    python jobs/clip.py --data pretrain_vlm_data.jsonl --images pretrain_images/ --tokenizer DIR \\
        --vision-model /models/my-clip-config --register-as minimind-clip

On the demo world the tower is cached per seed and settings: a second run reuses it (--no-reuse trains
again). Held-out retrieval (each held-out picture's most similar held-out caption is its own) is logged
before and after.
"""

from minimind.driver.clip_runner import ClipConfig, main, train_clip

__all__ = ["ClipConfig", "main", "train_clip"]  # train_clip(config, parent_run_id=None): what the pipeline calls


if __name__ == "__main__":
    main(description=__doc__)
