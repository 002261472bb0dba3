"""The whole pipeline on the embedded demo world: tokenizer -> pretrain -> SFT -> DPO -> reasoning
distillation -> tool calling, then MiniMind-V's VLM pretrain -> VLM SFT (from the SFT model, as MiniMind-V
does), each stage its own Ray Train run that registers its model for the next one, all grouped under one
MLflow parent run. Ends with a table of every stage's held-out metrics before and after the stage, the same
held-out prompts answered after each text stage, and how the vision models describe unseen pictures
(also logged to the parent run as tables and metrics).

    python jobs/pipeline.py                     # 15-17 minutes on 2 slow CPU cores (922-1027 s, docs/demo_results.md)
    python jobs/pipeline.py --scale 0.2         # a quick smoke run: a fifth of the steps
    python jobs/pipeline.py --seeds 0,1,2 --report docs/demo_results.md   # once per seed, one after the
                                                # other, then the issue's targets checked on every seed
    python jobs/pipeline.py --generation minimind-3   # minimind-3's: its tokenizer style and chat template (a
                                                # think block in every reply), QK-norm, minimind-3v's projector and rule
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from minimind.demo import report
from minimind.driver.clip_runner import ClipConfig, train_clip
from minimind.driver.runner import run_stage
from minimind.driver.showcase import TEXT_STAGES, describe_pictures, stage_answers
from minimind.driver.stages import STAGES as STAGE_TABLE
from minimind.training.configs import (
    DistillConfig,
    DPOConfig,
    PretrainConfig,
    SFTConfig,
    ToolsConfig,
    VLMConfig,
    VLMSFTConfig,
)

STAGES = [  # (stage, its settings, the stage whose registered version it starts from)
    ("pretrain", PretrainConfig(epochs=10, lr=3e-3), None),
    ("sft", SFTConfig(epochs=3), "pretrain"),
    # lr 3e-5: at 1e-4 DPO cost 0.045 of the unseen phrasings and 0.048 of the never-asked facts (seed 0, 200 records each)
    ("dpo", DPOConfig(epochs=2, lr=3e-5), "sft"),
    # column addition appears suddenly, between steps 600 and 800 of a 6-epoch run (bench/stage_curve.py), and later on
    # another machine's rounding: 9 epochs leave a margin; a lower lr keeps the facts (1e-3 lost a third of the never-asked)
    ("reason", DistillConfig(epochs=9, lr=5e-4), "dpo"),
    # tool calling, from the reasoning model: 3 epochs left half the sums' calls wrong, 8 got every forecast right (seed 0)
    ("tools", ToolsConfig(epochs=8), "reason"),
    ("clip", ClipConfig(), None),  # the frozen vision tower, pretrained contrastively on the training pictures (cached per seed)
    ("vlm_pretrain", VLMConfig(epochs=4), "sft"),  # from the SFT model, with the clip stage's tower
    ("vlm_sft", VLMSFTConfig(epochs=2), "vlm_pretrain"),
]
VISION_STAGES = ("clip", "vlm_pretrain", "vlm_sft")
GENERATIONS = {  # the settings that make the pipeline train minimind-3's generation instead of MiniMind2's
    "minimind2": {},
    "minimind-3": {
        "pretrain": {"preset": "minimind-3-demo"},  # and the demo tokenizer in minimind-3's style
        "vlm_pretrain": {"projector": "mlp", "train_llm": "first-last"},
        "vlm_sft": {"train_llm": "first-last"},
    },
}


def main(argv: list[str] | None = None) -> list:
    """Every stage's StageResult, seed by seed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's number of steps (epochs) by this")
    parser.add_argument("--experiment", default="minimind")
    parser.add_argument(
        "--eval-limit",
        type=int,
        default=1000,
        help="held-out records per evaluation (the demo's files hold up to 600: all of them)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the demo world, the tokenizer, the vision tower and every stage's initialisation and batch order",
    )
    seeds.add_argument(
        "--seeds",
        type=_seed_list,
        help="comma-separated seeds (0,1,2): the whole pipeline once per seed, one after the other, "
        "each under its own MLflow parent run",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="write the results of every seed as Markdown here (docs/demo_results.md) and log it to each seed's parent run",
    )
    parser.add_argument("--text-only", action="store_true", help="stop after the text stages")
    parser.add_argument(
        "--harness-tasks",
        default="minimind_demo",
        help="lm-evaluation-harness tasks run on every text stage's model, scores logged on its registered version "
        "('' for none; at most --eval-limit documents per task)",
    )
    parser.add_argument(
        "--generation",
        choices=sorted(GENERATIONS),
        default="minimind2",
        help="MiniMind2's tokenizer, template and architecture, or minimind-3's (with minimind-3v's VLM settings)",
    )
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    every_result, runs, parents = [], [], []
    for seed in args.seeds or [args.seed]:
        results, run, parent = run_pipeline(args, seed)
        every_result += results
        runs.append(run)
        parents.append(parent)
    print(f"\nthe issue's targets, every seed ({', '.join(str(run['seed']) for run in runs)}):\n{report.targets_table(runs)}")
    if args.report:
        command = shlex.join(["python", "jobs/pipeline.py", *(sys.argv[1:] if argv is None else argv)])
        text = report.render(runs, command, datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), _machine())
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text, encoding="utf-8")
        for parent in parents:
            MlflowClient().log_artifact(parent, str(args.report))
        print(f"report: {args.report}")
    return every_result


def run_pipeline(args: argparse.Namespace, seed: int) -> tuple[list, dict, str]:
    """The whole pipeline for one seed under its own MLflow parent run: the stage results, the plain
    results dict minimind.demo.report reads, and the parent run's id."""
    from mlflow import MlflowClient

    from minimind import tracking
    from minimind.demo import demo_tokenizer

    started = time.perf_counter()
    tokenizer = demo_tokenizer(seed, style=args.generation)
    print(f"tokenizer: {tokenizer}")
    generation = GENERATIONS[args.generation]
    if generation:
        generation = {**generation, "pretrain": {**generation["pretrain"], "tokenizer": str(tokenizer)}}
    parent = tracking.start_parent_run(
        tracking.configure(args.experiment),
        f"pipeline-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"scale": args.scale, "eval_limit": args.eval_limit, "seed": seed, "generation": args.generation},
    )
    MlflowClient().set_tag(parent, "seed", str(seed))
    results = []
    registered: dict[str, str] = {}

    def run(name, config, starts_from):
        config = replace(config, experiment=args.experiment, eval_limit=args.eval_limit, seed=seed, **generation.get(name, {}))
        if name == "clip":
            if args.scale != 1.0:
                config = replace(config, max_steps=max(2, int(config.max_steps * args.scale)))
            results.append(train_clip(config, parent_run_id=parent))
        else:
            # the exact version the previous stage registered, never `latest`: another pipeline sharing the store cannot cut in
            config = replace(config, init=registered.get(starts_from))
            if name == "vlm_pretrain":
                config = replace(config, vision_model=registered.get("clip"))
            if args.scale != 1.0:
                steps_per_epoch = STAGE_TABLE[name].demo_steps_per_epoch  # the demo world's
                config = replace(config, max_steps=max(2, int(config.epochs * steps_per_epoch * args.scale)))
            results.append(run_stage(config, name, parent_run_id=parent))
        registered[name] = results[-1].model_uri

    try:
        for stage in STAGES:
            if args.text_only and stage[0] in VISION_STAGES:
                break
            run(*stage)
    except BaseException:
        tracking.end_parent_run(parent, {}, {}, failed=True)
        raise
    total = time.perf_counter() - started
    by_stage = {result.stage: result for result in results}

    print("\nstage         seconds  held-out metric                               before    after")
    for result in results:
        for key, value in result.after.items():
            print(
                f"{result.stage:13s} {result.seconds:7.0f}  {key.removeprefix('eval/'):44s} "
                f"{result.before.get(key, float('nan')):7.3f}  {value:7.3f}"
            )
    print(f"whole pipeline: {total:.0f}s")
    harness = _harness_scores(args, results, seed)
    answers = _show_answers({stage: by_stage[stage].model_dir for stage in TEXT_STAGES if stage in by_stage}, seed)
    pictures = _show_pictures(
        {stage: by_stage[stage].model_dir for stage in ("vlm_pretrain", "vlm_sft") if stage in by_stage}, seed
    )
    metrics = {"pipeline/seconds": total} | {f"{r.stage}/seconds": r.seconds for r in results}
    metrics |= {f"{r.stage}/{key.removeprefix('eval/')}": value for r in results for key, value in r.after.items()}
    metrics |= {f"{stage}/{key}": value for stage, found in harness.items() for key, value in found.items()}
    metrics |= {
        f"{stage}/{key}": found[key]
        for stage, found in pictures.items()
        for key in ("hallucination_rate", "describing_rate", "mean_reply_chars")
    }
    stage_metrics = [
        {"stage": r.stage, "model": r.model_uri, "metric": key.removeprefix("eval/"), "before": r.before.get(key), "after": value}
        for r in results
        for key, value in r.after.items()
    ]
    metrics["pipeline/seconds_with_reports"] = time.perf_counter() - started
    print(f"\nwhole pipeline with these reports: {metrics['pipeline/seconds_with_reports']:.0f}s")
    tracking.end_parent_run(
        parent,
        metrics,
        {
            "stage_metrics.json": stage_metrics,
            "training_results.json": answers,
            "picture_descriptions.json": [
                {"stage": stage, **sample} for stage, found in pictures.items() for sample in found["samples"]
            ],
        },
    )
    stages = {
        r.stage: {"before": r.before, "after": r.after, "seconds": r.seconds, **_stage_run_facts(r, seed, args.eval_limit)}
        for r in results
    }
    run_results = {
        "seed": seed,
        "seconds": total,
        "seconds_with_reports": metrics["pipeline/seconds_with_reports"],
        "stages": stages,
        "answers": answers,
        "pictures": pictures,
        "harness": harness,
    }
    return results, run_results, parent


def _harness_scores(args: argparse.Namespace, results: list, seed: int) -> dict[str, dict[str, float]]:
    """`--harness-tasks` on every text stage's registered model (`minimind eval`'s path): per stage, the scores as
    logged on the version's run (`harness/<task>/<metric>`), and a table of them."""
    from minimind.driver.harness import log_results, run_harness, scores

    tasks = [task for task in args.harness_tasks.split(",") if task]
    text_models = [(r.stage, r.model_uri) for r in results if r.stage not in VISION_STAGES]
    if not tasks or not text_models:
        return {}
    limit = args.eval_limit if args.eval_limit < 1000 else None
    settings = {"limit": limit, "batch_size": 16, "chat_template": True, "device": None, "seed": seed}
    found = {}
    for stage, model in text_models:
        outcome = run_harness(model, tasks, **settings)
        log_results(model, outcome, {"harness.tasks": ",".join(tasks), "harness.limit": str(limit)})
        found[stage] = scores(outcome)
    keys = list(dict.fromkeys(key for figures in found.values() for key in figures))
    print(f"\nlm-evaluation-harness ({', '.join(tasks)}), on each text stage's model:")
    print("stage         " + "  ".join(f"{key.removeprefix('harness/'):>34s}" for key in keys))
    for stage, figures in found.items():
        print(f"{stage:13s} " + "  ".join(f"{figures.get(key, float('nan')):34.3f}" for key in keys))
    return found


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integer seeds: {text!r}")
    return seeds


ACCURACY_FILES = {  # metric -> the demo's held-out file the runner measures it on
    # (DPO and reasoning keep measuring the SFT answers)
    "eval/answer_exact_match": "sft_eval",
    "eval/reasoning_format": "reason_eval",
    "eval/reasoning_accuracy": "reason_eval",
    "eval/image_question_accuracy": "vlm_sft_eval",
}


def _stage_run_facts(result, seed: int, eval_limit: int) -> dict:
    """From the stage's MLflow run: the workers that trained it, and how many held-out records each
    figure is measured on. The loss and DPO's pair scores: the rows the run logged as scored
    (eval/rows); an accuracy: the first --eval-limit records of the demo's held-out file it reads, a
    family's: those of them naming it as their "task" (left out where the stage read other files)."""
    from collections import Counter

    from mlflow import MlflowClient

    from minimind.demo import demo_data
    from minimind.driver.evaluate import record_tasks

    stage_run = MlflowClient().get_run(result.run_id).data
    params = stage_run.params
    facts = (
        {"workers": f"{params['num_workers']} worker(s) × {float(params['cpus_per_worker']):g} CPUs"}
        if "num_workers" in params
        else {}
    )
    on_demo_files = not {"data", "eval_data", "answer_eval"} & set(params)
    paths = demo_data(seed) if on_demo_files else {}
    records = {}
    for key in result.after:
        metric, family = "/".join(key.split("/")[:2]), "/".join(key.split("/")[2:])
        if metric in ACCURACY_FILES:
            if on_demo_files:
                tasks = record_tasks(paths[ACCURACY_FILES[metric]], eval_limit)
                records[key] = Counter(tasks)[family] if family else len(tasks)
        elif "eval/rows" in stage_run.metrics:
            records[key] = int(stage_run.metrics["eval/rows"])
    return facts | {"records": records}


def _machine() -> dict[str, str]:
    import platform

    import torch

    from minimind import tracking

    cpuinfo = Path("/proc/cpuinfo")
    models = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return {
        "CPU": f"{models[0] if models else platform.processor() or 'unknown'}, {os.cpu_count()} logical cores",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads in the driver (evaluation, reports); "
        "training workers as each stage says",
        "load average when the report was written (1, 5, 15 min)": ", ".join(
            f"{load:.1f}" for load in os.getloadavg()
        ),  # other work on the CPU slows every stage
        "Python": platform.python_version(),
        "git commit": tracking.git_commit() or "unknown",
    }


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
    print(f"\nthe vision models describing {next(iter(report.values()))['pictures']} held-out pictures:")
    for stage, found in report.items():
        print(
            f"  {stage:13s} names a shape, colour or count in {found['describing_rate']:.0%} of replies, "
            f"one not in the picture in {found['hallucination_rate']:.0%}; "
            f"mean reply {found['mean_reply_chars']:.0f} characters"
        )
        for sample in found["samples"][:2]:
            print(
                f"    [{sample['image']}] {sample['reply']}"
                + (f"  (not in the picture: {sample['not_in_picture']})" if sample["not_in_picture"] else "")
            )
    return report


if __name__ == "__main__":
    main()
