"""The whole pipeline on the embedded demo world: tokenizer -> pretrain -> SFT -> DPO -> reasoning
distillation, then MiniMind-V's VLM pretrain -> VLM SFT (from the SFT model, as MiniMind-V does), each
stage its own Ray Train run that registers its model for the next one, all grouped under one MLflow
parent run. Ends with a table of every stage's held-out metrics before and after the stage, the same
held-out prompts answered after each text stage, and how the vision models describe unseen pictures
(also logged to the parent run as tables and metrics).

    python jobs/pipeline.py                     # about 8 minutes on 2 CPU cores (458 s measured)
    python jobs/pipeline.py --scale 0.2         # a quick smoke run: a fifth of the steps
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.demo.showcase import TEXT_STAGES, describe_pictures, stage_answers  # noqa: E402
from minimind.runner import run_stage  # noqa: E402
from minimind.stage_configs import DistillConfig, DPOConfig, PretrainConfig, SFTConfig, VLMConfig, VLMSFTConfig  # noqa: E402

STAGES = [  # (stage, its settings, the stage whose registered version it starts from)
    ("pretrain", PretrainConfig(epochs=10, lr=3e-3), None),
    ("sft", SFTConfig(epochs=3), "pretrain"),
    ("dpo", DPOConfig(epochs=2), "sft"),
    ("reason", DistillConfig(epochs=6, lr=5e-4), "dpo"),  # column addition needs about 700 steps; a lower lr keeps the facts
    ("vlm_pretrain", VLMConfig(epochs=4), "sft"),
    ("vlm_sft", VLMSFTConfig(epochs=2), "vlm_pretrain"),
]


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's number of steps (epochs) by this")
    parser.add_argument("--experiment", default="minimind")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the demo world, the tokenizer, the vision tower and every stage's initialisation and batch order")
    parser.add_argument("--text-only", action="store_true", help="stop after the text stages")
    args = parser.parse_args(argv)

    from minimind import tracking
    from minimind.demo import demo_tokenizer

    started = time.perf_counter()
    print(f"tokenizer: {demo_tokenizer(args.seed)}")
    parent = tracking.start_parent_run(tracking.configure(args.experiment), f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", {"scale": args.scale, "eval_limit": args.eval_limit, "seed": args.seed})
    results = []
    registered: dict[str, str] = {}
    try:
        for name, config, starts_from in STAGES:
            if args.text_only and name.startswith("vlm"):
                break
            # the exact version the previous stage registered, never `latest`: another pipeline sharing the store cannot cut in
            config = replace(config, experiment=args.experiment, eval_limit=args.eval_limit, seed=args.seed, init=registered.get(starts_from))
            if args.scale != 1.0:
                steps_per_epoch = {"pretrain": 71, "sft": 116, "dpo": 116, "reason": 134, "vlm_pretrain": 138, "vlm_sft": 138}[name]  # the demo world's
                config = replace(config, max_steps=max(2, int(config.epochs * steps_per_epoch * args.scale)))
            results.append(run_stage(config, name, parent_run_id=parent))
            registered[name] = results[-1].model_uri
    except BaseException:
        tracking.end_parent_run(parent, {}, {}, failed=True)
        raise
    total = time.perf_counter() - started
    by_stage = {result.stage: result for result in results}

    print("\nstage         seconds  held-out metric                               before    after")
    for result in results:
        for key, value in result.after.items():
            print(f"{result.stage:13s} {result.seconds:7.0f}  {key.removeprefix('eval/'):44s} {result.before.get(key, float('nan')):7.3f}  {value:7.3f}")
    print(f"whole pipeline: {total:.0f}s")
    answers = _show_answers({stage: by_stage[stage].model_dir for stage in TEXT_STAGES if stage in by_stage}, args.seed)
    pictures = _show_pictures({stage: by_stage[stage].model_dir for stage in ("vlm_pretrain", "vlm_sft") if stage in by_stage}, args.seed)
    metrics = {"pipeline/seconds": total} | {f"{r.stage}/seconds": r.seconds for r in results}
    metrics |= {f"{r.stage}/{key.removeprefix('eval/')}": value for r in results for key, value in r.after.items()}
    metrics |= {f"{stage}/{key}": found[key] for stage, found in pictures.items() for key in ("hallucination_rate", "describing_rate", "mean_reply_chars")}
    stage_metrics = [{"stage": r.stage, "model": r.model_uri, "metric": key.removeprefix("eval/"), "before": r.before.get(key), "after": value}
                     for r in results for key, value in r.after.items()]
    metrics["pipeline/seconds_with_reports"] = time.perf_counter() - started
    print(f"\nwhole pipeline with these reports: {metrics['pipeline/seconds_with_reports']:.0f}s")
    tracking.end_parent_run(parent, metrics, {
        "stage_metrics.json": stage_metrics, "training_results.json": answers,
        "picture_descriptions.json": [{"stage": stage, **sample} for stage, found in pictures.items() for sample in found["samples"]],
    })
    return results


def _flat(text: str) -> str:
    return text.replace("\n", " ⏎ ")


def _show_answers(model_dirs: dict, seed: int) -> list[dict]:
    rows = stage_answers(model_dirs, seed)
    print("\ntraining results: the same held-out prompts after each stage (pretrain: continuing the reference's first words)")
    for row in rows:
        print(f"  [{row['task']}] {row['prompt']}")
        for stage in model_dirs:
            print(f"    {stage:9s} {_flat(row[stage])}")
        print(f"    {'reference':9s} {_flat(row['reference'])}")
    return rows


def _show_pictures(model_dirs: dict, seed: int) -> dict:
    if not model_dirs:
        return {}
    report = describe_pictures(model_dirs, seed=seed)
    print("\nthe vision models describing 100 held-out pictures:")
    for stage, found in report.items():
        print(f"  {stage:13s} names a shape, colour or count in {found['describing_rate']:.0%} of replies, one not in the picture in "
              f"{found['hallucination_rate']:.0%}; mean reply {found['mean_reply_chars']:.0f} characters")
        for sample in found["samples"][:2]:
            print(f"    [{sample['image']}] {sample['reply']}" + (f"  (not in the picture: {sample['not_in_picture']})" if sample["not_in_picture"] else ""))
    return report


if __name__ == "__main__":
    main()
