"""The whole pipeline on the embedded demo world: tokenizer -> pretrain -> SFT -> DPO -> reasoning
distillation, then MiniMind-V's VLM pretrain -> VLM SFT (from the SFT model, as MiniMind-V does), each
stage its own Ray Train run that registers its model for the next one. Ends with a table of every
stage's held-out metrics before and after the stage, and a few answers of the final models.

    python jobs/pipeline.py                     # about 8 minutes on 2 CPU cores (494 s measured)
    python jobs/pipeline.py --scale 0.2         # a quick smoke run: a fifth of the steps
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.runner import run_stage  # noqa: E402
from minimind.stage_configs import DistillConfig, DPOConfig, PretrainConfig, SFTConfig, VLMConfig, VLMSFTConfig  # noqa: E402

STAGES = [  # (stage, its settings, the stage whose registered version it starts from)
    ("pretrain", PretrainConfig(epochs=10, lr=3e-3), None),
    ("sft", SFTConfig(epochs=3), "pretrain"),
    ("dpo", DPOConfig(epochs=1), "sft"),
    ("reason", DistillConfig(epochs=2), "dpo"),
    ("vlm_pretrain", VLMConfig(epochs=1), "sft"),
    ("vlm_sft", VLMSFTConfig(epochs=2), "vlm_pretrain"),
]


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's number of steps (epochs) by this")
    parser.add_argument("--experiment", default="minimind")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--text-only", action="store_true", help="stop after the text stages")
    args = parser.parse_args(argv)

    from minimind.demo import demo_tokenizer

    started = time.perf_counter()
    print(f"tokenizer: {demo_tokenizer()}")
    results = []
    registered: dict[str, str] = {}
    for name, config, starts_from in STAGES:
        if args.text_only and name.startswith("vlm"):
            break
        # the exact version the previous stage registered, never `latest`: another pipeline sharing the store cannot cut in
        config = replace(config, experiment=args.experiment, eval_limit=args.eval_limit, init=registered.get(starts_from))
        if args.scale != 1.0:
            steps_per_epoch = {"pretrain": 60, "sft": 273, "dpo": 182, "reason": 165, "vlm_pretrain": 138, "vlm_sft": 138}[name]  # the demo world's
            config = replace(config, max_steps=max(2, int(config.epochs * steps_per_epoch * args.scale)))
        results.append(run_stage(config, name))
        registered[name] = results[-1].model_uri
    total = time.perf_counter() - started

    print("\nstage         model                             seconds  held-out metrics: before -> after")
    for result in results:
        metrics = ", ".join(f"{key.split('/')[-1]} {result.before.get(key, float('nan')):.3f} -> {value:.3f}" for key, value in result.after.items())
        print(f"{result.stage:13s} {result.model_uri:33s} {result.seconds:7.0f}  {metrics}")
    print(f"whole pipeline: {total:.0f}s")
    by_stage = {result.stage: result for result in results}
    _show_answers(by_stage["reason"].model_dir)
    if "vlm_sft" in by_stage:
        _show_image_answers(by_stage["vlm_sft"].model_dir)
    return results


def _show_answers(model_dir: Path) -> None:
    from minimind.checkpoint import load_model
    from minimind.demo import demo_data
    from minimind.evaluate import text_replier
    from minimind.data import iter_jsonl
    from minimind.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    reply = text_replier(model, tokenizer, max_new_tokens=160)
    paths = demo_data()
    questions = [record["conversations"][:-1] for _, record in list(iter_jsonl(paths["sft_eval"], "sft"))[:2]]
    questions += [record["conversations"][:-1] for _, record in list(iter_jsonl(paths["reason_eval"], "sft"))[:1]]
    print("\nsample answers of the final model:")
    for conversation, answer in zip(questions, reply(questions)):
        print(f"  Q: {conversation[-1]['content']}\n  A: {answer}")



def _show_image_answers(model_dir: Path) -> None:
    from minimind.data import iter_jsonl
    from minimind.demo import demo_data
    from minimind.evaluate import vlm_replier
    from minimind.tokenizer import load_tokenizer
    from minimind.vision import load_vlm

    paths = demo_data()
    records = [record for _, record in list(iter_jsonl(paths["vlm_sft_eval"], "vlm"))[:3]]
    queries = [(record["conversations"][:-1], [paths["images"] / name for name in record["images"]]) for record in records]
    print("\nsample answers of the final vision model:")
    for (conversation, images), answer, record in zip(queries, vlm_replier(load_vlm(model_dir), load_tokenizer(model_dir))(queries), records):
        print(f"  [{', '.join(image.name for image in images)}] Q: {conversation[-1]['content']!r}\n  A: {answer}  (reference: {record['conversations'][-1]['content']})")


if __name__ == "__main__":
    main()
