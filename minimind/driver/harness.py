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
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from minimind import storage, tracking
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


def task_folders(include_paths, seed: int = 0) -> list[str]:
    """The folders of task YAML a run looks in: the demo's (written with the demo data), then the user's."""
    return [str(demo_data(seed)["harness"]), *(str(Path(path).resolve()) for path in include_paths)]


def check_tasks(tasks: list[str], folders: list[str]) -> None:
    unknown = [task for task in tasks if task not in task_manager(tuple(folders)).all_tasks]
    if unknown:
        raise SystemExit(f"unknown harness task(s): {', '.join(unknown)} (local tasks: --include-path DIR holding their YAML)")


def document_text(task, doc) -> str:
    """One evaluation document as text: the task's prompt, then its right answer (a choice's text, not its index)."""
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    return f"{task.doc_to_text(doc)} {target}"


def task_documents(tasks: list[str], include_paths=(), seed: int = 0) -> dict[str, list[str]]:
    """Each named task's evaluation documents as text, groups and tags expanded to their tasks: what the data
    report's contamination check looks for in training data."""
    from lm_eval.tasks import get_task_dict

    folders = task_folders(include_paths, seed)
    check_tasks(tasks, folders)
    documents: dict[str, list[str]] = {}

    def collect(tree: dict) -> None:
        for name, task in tree.items():
            if isinstance(task, dict):
                collect(task)
            else:
                documents[name] = [document_text(task, doc) for doc in task.eval_docs]

    collect(get_task_dict(tasks, task_manager(tuple(folders))))
    return documents


def evaluate_folder(folder: Path, name: str, tasks: list[str], folders: list[str], settings: dict) -> dict:
    """The harness's results (samples left out) for the model in `folder`. `settings`: limit, batch_size,
    chat_template, device, seed."""
    from lm_eval import simple_evaluate

    seed = settings["seed"]
    harness_model = HarnessLM(Chat.load(folder, device=settings["device"]), name=name, batch_size=settings["batch_size"])
    results = simple_evaluate(model=harness_model, tasks=tasks, task_manager=task_manager(tuple(folders)),
                              limit=settings["limit"], apply_chat_template=settings["chat_template"], log_samples=False,
                              bootstrap_iters=1000,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results.pop("samples", None)
    return results


def run_harness(model: str, tasks: list[str], include_paths=(), **settings) -> dict:
    """`tasks` on `model` (a folder or models:/ URI) in this process."""
    folders = task_folders(include_paths, settings["seed"])
    check_tasks(tasks, folders)
    with tracking.resolved_model(model) as folder:
        return evaluate_folder(folder, Path(model).name or model, tasks, folders, settings)


def run_harness_on_cluster(model: str, tasks: list[str], include_paths=(), storage_path: str | None = None,
                           cpus_per_task: int = 1, **settings) -> dict:
    """`tasks` on `model`, one Ray task per named task (a group or tag stays whole, so its aggregate is the
    harness's own), spread over the cluster; their results merged. The model and the task folders are staged on
    the run's storage first: a worker reads nothing from the driver's disk."""
    import ray

    from minimind.driver.inputs import start_ray, storage_path_of

    folders = task_folders(include_paths, settings["seed"])
    check_tasks(tasks, folders)
    start_ray()
    inputs = storage.join(storage_path_of(storage_path), f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", "inputs")
    with tracking.resolved_model(model) as folder:
        model_uri = storage.stage_input(folder, storage.join(inputs, "model"))
    staged = [(path, storage.stage_input(path, storage.join(inputs, f"tasks-{index}"))) for index, path in enumerate(folders)]
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    on_worker = ray.remote(num_cpus=cpus_per_task, num_gpus=1 if use_gpu else 0)(evaluate_on_worker)
    name = Path(model).name or model
    parts = ray.get([on_worker.remote(model_uri, name, task, staged, settings, cpus_per_task) for task in tasks])
    merged = parts[0]
    for part in parts[1:]:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
    return merged


def evaluate_on_worker(model_uri: str, name: str, task: str, staged: list[tuple[str, str]], settings: dict,
                       threads: int | None = None) -> dict:
    """One task on a worker (`threads`: its CPUs): the model and task folders fetched from storage; the folders'
    YAML, which name their data files by the driver's paths, rewritten to this node's copies."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    folders = []
    for driver_path, uri in staged:
        local = Path(tempfile.mkdtemp(prefix="minimind-tasks-")) / "tasks"
        shutil.copytree(storage.fetch(uri), local)
        for yaml in local.rglob("*.yaml"):
            yaml.write_text(yaml.read_text(encoding="utf-8").replace(driver_path, str(local)), encoding="utf-8")
        folders.append(str(local))
    return evaluate_folder(storage.fetch(model_uri), name, [task], folders, settings)


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
