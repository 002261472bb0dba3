"""`minimind eval MODEL --tasks ...`: lm-evaluation-harness tasks on a model folder or `models:/` URI (LoRA adapters
merged), the scores logged to MLflow on the model's own run.

Any harness task runs (`ceval-valid`, `cmmlu`, `hellaswag`, `gsm8k`, ... where the machine can fetch them), and tasks
from local folders in the harness's own format (`--include-path`). The demo's tasks (`minimind_demo`, written
with the demo data: `minimind/demo/benchmark.py`) are always included, so the command runs offline.

Where the scores go: a registered version's run (`models:/NAME/VERSION`, `@alias`, `latest`) gets them as metrics
`harness/<task>/<metric>` (and the harness's group aggregates alike), with the full results as
`harness/results.json`; a folder gets a run of its own, `eval-<folder name>`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from minimind import tracking
from minimind.demo import demo_data
from minimind.driver.gate import Verdict, figure, judge
from minimind.inference.chat import Chat
from minimind.inference.harness import HarnessLM


def scores(results: dict) -> dict[str, float]:
    """`harness/<task>/<metric>` for each task's and group's figures (`acc,none` -> `acc`; a named filter is kept:
    `exact_match,last_number` -> `exact_match_last_number`); standard errors left out."""
    flat = {}
    for section in ("results", "groups"):
        for task, figures in results.get(section, {}).items():
            for key, value in figures.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, filter_name = key.split(",", 1)
                flat[f"harness/{task}/{metric}" + ("" if filter_name == "none" else f"_{filter_name}")] = float(value)
    return flat


@lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...]):
    """The harness's task index with the demo's tasks and `include_paths` (indexing its ~15k tasks takes seconds:
    one per process and set of folders)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths))


def run_harness(model: str, tasks: list[str], include_paths: list[str] = (), limit: float | None = None,
                batch_size: int = 16, chat_template: bool = True, device: str | None = None, seed: int = 0) -> dict:
    """The harness's results for `model` on `tasks` (its full results dict, samples left out)."""
    from lm_eval import simple_evaluate

    tasks_known = task_manager((str(demo_data(seed)["harness"]), *map(str, include_paths)))
    unknown = [task for task in tasks if task not in tasks_known.all_tasks]
    if unknown:
        raise SystemExit(f"unknown harness task(s): {', '.join(unknown)} (local tasks: --include-path DIR holding their YAML)")
    with tracking.resolved_model(model) as folder:
        harness_model = HarnessLM(Chat.load(folder, device=device), name=Path(model).name or model, batch_size=batch_size)
        results = simple_evaluate(model=harness_model, tasks=tasks, task_manager=tasks_known, limit=limit,
                                  apply_chat_template=chat_template, log_samples=False, bootstrap_iters=1000,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results.pop("samples", None)
    return results


def log_results(model: str, results: dict, tags: dict[str, str]) -> str:
    """The scores on the model's run (a registered version's, else a new `eval-<folder>` run); its run id."""
    import mlflow

    tracking.configure()
    source = tracking.model_source(model)
    run_id = None
    if "source.version" in source:
        run_id = mlflow.MlflowClient().get_model_version(source["source.name"], source["source.version"]).run_id
    run_name = None if run_id else f"eval-{Path(model).name}"
    with mlflow.start_run(run_id=run_id, run_name=run_name) as run:
        mlflow.log_metrics(scores(results))
        mlflow.log_text(json.dumps(results, ensure_ascii=False, indent=2, default=str), "harness/results.json")
        mlflow.set_tags({**({"harness.model": model} if not run_id else {}), **tags})
        return run.info.run_id


def promote(model: str, alias: str, gate: dict[str, float], candidate: dict[str, float], limit: float | None,
            evaluate) -> Verdict:
    """Move `alias` to `model`'s version if `judge` says so; the comparison as tags on both versions. `evaluate(uri)`
    scores the current holder when its run holds no scores of the same tasks and --limit."""
    import mlflow

    tracking.check_alias(alias)
    source = tracking.model_source(model)
    if "source.version" not in source:
        raise ValueError(f"--promote needs a registered version (models:/NAME/VERSION, latest or @alias), not {model}")
    name, version = source["source.name"], source["source.version"]
    client = mlflow.MlflowClient()
    holder = client.get_registered_model(name).aliases.get(alias)
    champion = None
    if holder is not None and str(holder) != version:
        run = client.get_run(client.get_model_version(name, str(holder)).run_id)
        recorded = {key: value for key, value in run.data.metrics.items() if key.startswith("harness/")}
        try:
            [figure(recorded, gated) for gated in gate]
            same_settings = run.data.tags.get("harness.limit") == str(limit)
        except ValueError:  # not scored on these tasks
            same_settings = False
        champion = recorded if same_settings else scores(evaluate(f"models:/{name}/{holder}"))
    verdict = judge(gate, candidate, champion)
    if verdict.promoted:
        client.set_registered_model_alias(name, alias, version)
    compared = json.dumps({key: {"candidate": mine, "holder": theirs} for key, (mine, theirs) in verdict.compared.items()})
    client.set_model_version_tag(name, version, f"gate.{alias}", "promoted" if verdict.promoted else "refused")
    client.set_model_version_tag(name, version, f"gate.{alias}.reason", verdict.reason)
    client.set_model_version_tag(name, version, f"gate.{alias}.holder", f"v{holder}" if holder is not None else "none")
    client.set_model_version_tag(name, version, f"gate.{alias}.scores", compared)
    if champion is not None:
        client.set_model_version_tag(name, str(holder), f"gate.{alias}.challenged_by.v{version}",
                                      ("promoted: " if verdict.promoted else "refused: ") + verdict.reason)
    return verdict
