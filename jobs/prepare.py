"""Prepare a stage's data once, over the Ray cluster's CPUs: validate, tokenize, label, pack into compact
token shards + a manifest + a data report, on storage every node reads. Every stage job does this step
itself when its prepared data is missing; run it alone to prepare ahead, or to read the data report
before training.

    python jobs/prepare.py                                   # the demo's SFT file, as `python jobs/sft.py` uses it
    python jobs/prepare.py --stage sft --data s3://bucket/sft_mini_512.jsonl --tokenizer models:/minimind-pretrain/3 \
        --seq-len 512 --storage-path s3://bucket/minimind/ray_results
    ray job submit --working-dir . -- python jobs/prepare.py --stage pretrain --data s3://bucket/pretrain_hq.jsonl ...
    python jobs/prepare.py --stage pretrain --eval-tasks minimind_demo     # and the 13-gram contamination check

The same file, tokenizer and settings are never prepared twice: the output folder is named after them,
and it is reused only when the file's whole content has the digest its manifest recorded. Long work shows
its progress (chunks done, MB/s, ETA): in place on a terminal, a line per 5% in a log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minimind.training.flags import option, parse_config


@dataclass
class PrepareConfig:
    stage: str = option("the stage whose rows to prepare: pretrain, sft, dpo, reason, kd, vlm_pretrain, vlm_sft", default="sft")
    data: str | None = option(
        "JSONL, or Parquet (a .parquet file or folder): a path or storage URI (default: the demo world's file for the stage)",
        default=None,
    )
    tokenizer: str | None = option(
        "tokenizer or model directory, or a models:/ URI (default: the demo tokenizer, with the demo data only)", default=None
    )
    seq_len: int = option("longest row in tokens (the stage job's --seq-len)", default=256)
    image_tokens: int = option(
        "vlm: placeholder tokens per image (default: the --tokenizer model's tower, else the demo tower's)", default=0
    )
    skip_bad: bool = option(
        "skip malformed lines (not JSON, wrong types, missing keys; counted) "
        "instead of stopping at the first (a blank pretraining text is no "
        "error: it is left out and counted in the data report)",
        default=False,
    )
    drop_duplicates: bool = option("leave out records that exactly repeat an earlier one", default=False)
    storage_path: str | None = option("Ray storage of the stage jobs; prepared data goes to <it>/prepared", default=None)
    prepared: str | None = option("where prepared data is kept (default: <storage-path>/prepared)", default=None)
    chunk_mb: int = option("MB of the file per Ray task (one shard each)", default=32)
    seed: int = option("without --data: the demo world of this seed (the stage job's --seed)", default=0)
    eval_tasks: str | None = option(
        "lm-evaluation-harness tasks, comma-separated (e.g. ceval-valid,cmmlu; minimind_demo offline): report which of "
        "their documents share a 13-gram with the data (contamination.json in the prepared folder)",
        default=None,
    )
    eval_include_path: str | None = option("a folder of harness task YAML for --eval-tasks", default=None)


def main(argv: list[str] | None = None):
    from minimind import tracking
    from minimind.data.parquet import prepare_any
    from minimind.driver.inputs import prepared_root
    from minimind.driver.stages import STAGES
    from minimind.model.tokenizer import load_tokenizer
    from minimind.model.vision import VISION_CONFIG_NAME, VisionConfig, image_token_count, is_vlm_dir, load_vision_tower
    from minimind.training.loop import stage_data

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = parse_config(PrepareConfig, argv, __doc__)
    if config.stage not in STAGES:
        raise SystemExit(f"--stage {config.stage!r}: expected one of {', '.join(STAGES)}")
    stage = STAGES[config.stage]
    if config.data and not config.tokenizer:
        raise SystemExit(
            "--data needs --tokenizer (the one the stage trains with); only the demo data falls back to the demo tokenizer"
        )
    from minimind.demo import demo_data, demo_tokenizer, demo_vision_tower

    data = config.data or str(demo_data(config.seed)[stage.demo_file])
    source = (
        Path(tracking.resolve_model(config.tokenizer, tracking.PROJECT_ROOT / "checkpoints" / "prepare-tokenizer"))
        if config.tokenizer
        else demo_tokenizer(config.seed)
    )
    image_tokens = config.image_tokens
    if stage.data_kind == "vlm" and not image_tokens:
        tower_config = source / VISION_CONFIG_NAME if is_vlm_dir(source) else None
        image_tokens = (
            VisionConfig.load(tower_config).image_tokens
            if tower_config
            else image_token_count(load_vision_tower(demo_vision_tower(config.seed))[0])
        )
    rows_spec = stage_data(stage, config, image_tokens or 1)
    prepared = prepare_any(
        data,
        load_tokenizer(source),
        rows_spec,
        prepared_root(config.prepared, config.storage_path),
        skip_bad=config.skip_bad,
        drop_duplicates=config.drop_duplicates,
        chunk_bytes=config.chunk_mb << 20,
    )
    print(
        f"prepared data: {prepared.location}"
        + ("" if prepared.reused else f" (report: {prepared.location}/report.json, report.png)")
    )
    if config.eval_tasks:
        check_eval_tasks(config, data, rows_spec.kind, prepared.location)
    return prepared


def check_eval_tasks(config: PrepareConfig, data: str, kind: str, location: str) -> dict:
    from minimind.data.contamination import EvalSet
    from minimind.data.parquet import check_contamination_parquet, is_parquet
    from minimind.data.prepare import check_contamination
    from minimind.driver.harness import task_documents

    tasks = [task.strip() for task in config.eval_tasks.split(",") if task.strip()]
    include = [config.eval_include_path] if config.eval_include_path else []
    evaluation = EvalSet(task_documents(tasks, include, config.seed))
    if is_parquet(data):
        report = check_contamination_parquet(data, kind, evaluation, location)
    else:
        report = check_contamination(data, kind, evaluation, location, chunk_bytes=config.chunk_mb << 20)
    print(f"contamination report: {location}/contamination.json")
    return report


if __name__ == "__main__":
    main()
