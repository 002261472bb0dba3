"""MLflow for MiniMind: where the store lives, registering model directories, resolving `models:/` URIs,
and the plots and tables a training run logs. The project's only MLflow module; jobs call it from rank 0.

A model is a plain directory (`model.safetensors + config.json + tokenizer files`). It is registered as
an MLflow 3 LoggedModel whose artifacts are that directory, so `models:/minimind-sft/latest` downloads
back to the same directory that was saved, with no MLflow flavour or pickling in between.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CONFIG_NAME = "config.json"  # the file that marks a model directory (see minimind.model.checkpoint)
ADAPTER_CONFIG_NAME = "adapter_config.json"  # ... and a LoRA adapter directory (see minimind.model.lora)
MODEL_MARKERS = (CONFIG_NAME, ADAPTER_CONFIG_NAME)
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # minimind/
_ALIAS_PATTERN = re.compile(r"^[\w-]+$")  # what MLflow accepts as an alias name
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)  # MLflow reserves these for versions
_REGISTERED_BY = {  # for "not registered yet" errors
    "minimind-pretrain": "jobs/pretrain.py",
    "minimind-sft": "jobs/sft.py",
    "minimind-dpo": "jobs/dpo.py",
    "minimind-reason": "jobs/distill.py",
    "minimind-grpo": "jobs/grpo.py",
    "minimind-clip-demo": "jobs/clip.py",
    "minimind-vlm-pretrain": "jobs/pretrain_vlm.py",
    "minimind-vlm-sft": "jobs/sft_vlm.py",
}
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")  # `models:/m-...`: a LoggedModel, not a registered name


# --------------------------------------------------------------------------- where things live


def project_root(package_dir: Path = _PACKAGE_DIR) -> Path:
    """The checkout when running from one (so the store sits next to the code, git-ignored), else
    `~/.minimind`; `$MINIMIND_HOME` overrides both. Read on every call so tests and jobs can set it late.

    A job sent with `ray job submit --working-dir .` runs from a copy Ray unpacked into its session's
    temporary folder (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`): that copy is not a
    home, since it vanishes at `ray stop` and changes with every code change, so `~/.minimind` it is."""
    if os.environ.get("MINIMIND_HOME"):
        return Path(os.environ["MINIMIND_HOME"]).expanduser().resolve()
    checkout = package_dir.parent
    if (checkout / "pyproject.toml").is_file() and not in_ray_package(checkout):
        return checkout
    return Path.home() / ".minimind"


def in_ray_package(path: Path) -> bool:
    """Whether `path` lies in a working directory Ray unpacked for a job (temporary, per code version)."""
    return any(part.startswith("_ray_pkg_") or part == "runtime_resources" for part in Path(path).resolve().parts)


def __getattr__(name: str):
    # `tracking.PROJECT_ROOT` is computed on access, so a `$MINIMIND_HOME` set after import still counts.
    if name == "PROJECT_ROOT":
        return project_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths count from the cwd, as in SQLAlchemy)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else the project's SQLite store. Always absolute: Ray workers run in temporary
    directories, and a relative `sqlite:///mlflow.db` would give each of them a store of its own."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        database = _sqlite_path(uri)
        if database is None:
            return uri
        query = uri.partition("?")[2]
        return f"sqlite:///{database}" + (f"?{query}" if query else "")
    store = project_root() / "mlflow" / "store"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"  # the path is absolute, so this reads sqlite:////...


def local_store_path(uri: str | None = None) -> Path | None:
    """The database file when the tracking URI is a local SQLite store (None for a tracking server)."""
    return _sqlite_path(uri or mlflow.get_tracking_uri())


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to its database file, by absolute path; otherwise (the
    default) they would land relative to whichever process created the experiment. A tracking server
    decides for itself (None)."""
    database = _sqlite_path(uri)
    return str(database.parent / "artifacts") if database else None


def configure(experiment: str = "minimind") -> str:
    """Point MLflow at the project's store, make `experiment` active (creating it if missing) and return
    its id. `MLFLOW_TRACKING_URI` is exported so subprocesses and Ray workers use the same store."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = _open_store(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(experiment).experiment_id  # another process won the race
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _open_store(uri: str) -> MlflowClient:
    """A client whose store exists. MLflow creates a new SQLite store's tables on first use, and two
    processes doing that at once fail or half-migrate the file ("table ... already exists"), so the
    first use happens under a lock file next to the database."""
    database = _sqlite_path(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri)
    with FileLock(f"{database}.lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates or migrates the tables if needed
    return client


def _client() -> MlflowClient:
    """A client on the project's store; without this, an unconfigured process would silently create
    `./mlflow.db` in its cwd (MLflow's default) and find no models there."""
    if not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(default_tracking_uri())
    return _open_store(mlflow.get_tracking_uri())


# --------------------------------------------------------------------------- models:/ and runs:/ references


def _job_hint(name: str) -> str:
    job = _REGISTERED_BY.get(name)
    return f"{name} is registered by {job} when it finishes" if job else "models are registered by the training jobs in jobs/"


def _registered_names(client: MlflowClient) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_registered_models(page_token=token)
        names += [model.name for model in page]
        token = page.token
        if not token:
            return sorted(names)


def _versions(client: MlflowClient, name: str) -> list[int]:
    return sorted(int(version.version) for version in client.search_model_versions(f"name='{name}'"))


def _model_version(client: MlflowClient, reference: str) -> "ModelVersion":
    """The registered version a `models:/NAME/latest`, `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI
    means now, with errors that say what does exist."""
    body = reference[len("models:/") :]
    name, alias, version = body, None, None
    if "@" in body:
        name, alias = body.rsplit("@", 1)
    elif "/" in body:
        name, version = body.split("/", 1)
    if alias is not None:
        readable = bool(alias)
    else:  # stages (models:/NAME/Production) are deprecated in MLflow 3 and not used here
        readable = version is not None and (version.isdigit() or version.lower() == "latest")
    if not name or "/" in name or not readable:
        raise ValueError(f"cannot read {reference!r}: expected models:/NAME/latest, models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        existing = _registered_names(client)
        listing = f"registered models: {', '.join(existing)}" if existing else "no models are registered yet"
        raise ValueError(f"no registered model named {name!r} ({listing}); {_job_hint(name)}") from None
    if alias is not None:
        if alias not in registered.aliases:
            known = ", ".join(f"@{key} -> v{value}" for key, value in sorted(registered.aliases.items())) or "none"
            raise ValueError(f"model {name!r} has no alias {alias!r}; its aliases: {known}")
        return client.get_model_version(name, str(registered.aliases[alias]))
    versions = _versions(client, name)
    if not versions:
        raise ValueError(f"model {name!r} has no versions; {_job_hint(name)}")
    if version.lower() == "latest":
        version = str(versions[-1])
    if int(version) not in versions:
        raise ValueError(f"model {name!r} has no version {version}; its versions: {', '.join(map(str, versions))}")
    return client.get_model_version(name, version)


def _is_uri(reference: str) -> bool:
    scheme = reference.partition(":")[0]
    return ":" in reference and len(scheme) > 1 and scheme.replace("-", "").replace("+", "").isalnum()  # C:\ is a path


def _model_folder(root: Path, reference: str) -> Path:
    """The downloaded folder that holds config.json (or a LoRA adapter's config): the root itself, or the
    one subfolder that does (a `runs:/ID/dir` reference may hold the model further down). A download
    without any (a tokenizer directory) is returned as it is."""
    if any((root / marker).is_file() for marker in MODEL_MARKERS):
        return root
    found = sorted({path.parent for marker in MODEL_MARKERS for path in root.rglob(marker)}, key=lambda folder: (len(folder.parts), str(folder)))
    if not found:
        return root
    shallowest = [folder for folder in found if len(folder.parts) == len(found[0].parts)]
    if len(shallowest) > 1:
        folders = ", ".join(str(folder.relative_to(root)) for folder in shallowest)
        raise ValueError(f"{reference} holds several model directories ({folders}); name one in the URI")
    return found[0]


def _with_adapters_merged(adapter_dir: Path, destination: Path) -> Path:
    """A LoRA adapter folder as the plain model it stands for: its base (resolved like any reference, into
    a temporary folder removed once merged) with the adapters merged in, written beside `destination`."""
    from minimind.model.lora import LoRAConfig, merge_adapter_dir

    base = LoRAConfig.load(adapter_dir / ADAPTER_CONFIG_NAME).base
    if not base:
        raise ValueError(f"{adapter_dir} holds LoRA adapters but names no base model to apply them to")
    with tempfile.TemporaryDirectory(prefix="minimind-base-") as scratch:
        base_dir = resolve_model(base, Path(scratch) / "base")
        return merge_adapter_dir(adapter_dir, base_dir, destination.with_name(destination.name + "-merged"))


def pin(reference: str) -> str:
    """`models:/NAME/latest` or `models:/NAME@ALIAS` as the exact `models:/NAME/VERSION` it means now;
    anything else as it is. A stage resolves its inputs once, through this, and records the result, so
    a version registered meanwhile (by another pipeline sharing the store) never changes what it uses."""
    if reference.startswith("models:/") and not _LOGGED_MODEL_ID.match(reference[len("models:/") :]):
        found = _model_version(_client(), reference)
        return f"models:/{found.name}/{found.version}"
    return reference


def recorded_lineage(run_name: str) -> dict[str, str]:
    """The exact inputs (`lineage.*` tags) an earlier MLflow run of this Ray run name resolved, for --resume."""
    client = _client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`ray.run_name` = '{run_name}'",
                              order_by=["attributes.start_time ASC"], max_results=10)
    return next(({k: v for k, v in run.data.tags.items() if k.startswith("lineage.")} for run in runs
                 if any(k.startswith("lineage.") for k in run.data.tags)), {})


def resolve_model(reference: str, destination: str | Path | None = None, merge_adapters: bool = True) -> Path:
    """A local model directory for a path, `models:/...` or `runs:/RUN_ID/path` reference.

    URIs are downloaded to `destination` (default: `model` in a fresh temporary folder, which the caller
    then owns; `resolved_model` removes it for you). `dst_path` is always passed: without it MLflow may
    hand back the store's own folder, which a caller must never write to. LoRA adapters come back as the
    plain model they stand for: their base, resolved the same way, with the adapters merged in (beside
    `destination`: `<destination>-merged`; the base is removed once merged); with `merge_adapters=False`,
    as the adapter folder. A reference MLflow cannot download raises FileNotFoundError naming it.
    """
    path = Path(reference).expanduser()
    if not path.is_dir() and not _is_uri(reference):
        raise FileNotFoundError(f"{reference} is neither a directory nor a models:/ or runs:/ URI")
    destination = Path(destination) if destination is not None else None
    if path.is_dir():
        folder = path.resolve()
    else:
        client = _client()
        uri = reference
        if reference.startswith("models:/") and not _LOGGED_MODEL_ID.match(reference[len("models:/") :]):
            found = _model_version(client, reference)
            uri = f"models:/{found.name}/{found.version}"  # download exactly the version that was resolved
        destination = destination or _fresh_folder()
        destination.mkdir(parents=True, exist_ok=True)
        try:
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination))
        except MlflowException as error:
            raise FileNotFoundError(f"{reference} was not found: {first_line(error)}") from None
        folder = _model_folder(Path(downloaded).resolve(), reference)
    if merge_adapters and (folder / ADAPTER_CONFIG_NAME).is_file():
        return _with_adapters_merged(folder, destination or _fresh_folder())
    return folder


def _fresh_folder() -> Path:
    """`model` in a new temporary folder: what resolve_model writes beside it stays in that folder too."""
    return Path(tempfile.mkdtemp(prefix="minimind-model-")) / "model"


def first_line(error: BaseException) -> str:
    """An error's message as one line (an MLflow message can run to a stack trace of the server's), or its
    type's name when it has none."""
    lines = str(getattr(error, "message", None) or error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def resolved_model(reference: str, merge_adapters: bool = True) -> Iterator[Path]:
    """`resolve_model` into a temporary folder that is removed, with everything resolving wrote (an
    adapter's download and merged model), when the block ends: load what you need inside it."""
    with tempfile.TemporaryDirectory(prefix="minimind-model-") as scratch:
        yield resolve_model(reference, Path(scratch) / "model", merge_adapters)


def model_source(reference: str) -> dict[str, str]:
    """Tags that record which model a run started from, with `latest` and aliases resolved to a number,
    so the run still names the right version after newer ones are registered."""
    tags = {"source.uri": reference}
    if reference.startswith("models:/"):
        body = reference[len("models:/") :]
        if _LOGGED_MODEL_ID.match(body):
            tags["source.model_id"] = body
        else:
            found = _model_version(_client(), reference)
            tags |= {"source.name": found.name, "source.version": str(found.version)}
    elif reference.startswith("runs:/"):
        tags["source.run_id"] = reference[len("runs:/") :].split("/", 1)[0]
    return tags


# --------------------------------------------------------------------------- registering


def _check_alias(alias: str) -> None:
    if not _ALIAS_PATTERN.match(alias):
        raise ValueError(f"alias {alias!r} is not allowed: MLflow aliases use only letters, digits, '_' and '-'")
    if _RESERVED_ALIAS.match(alias):
        raise ValueError(
            f"alias {alias!r} is reserved by MLflow ('latest' always means the newest version and 'v<N>' version N); "
            "pick another name such as 'best' or 'candidate'"
        )


def log_model_dir(directory: str | Path, name: str, run_id: str | None = None) -> str:
    """Log a model directory as an MLflow LoggedModel of the run (default: the active run), READY but not
    registered, and return its id: `models:/<id>` downloads it from any node that reaches the tracking
    server. It is an MLflow pyfunc model (`minimind.tracking.pyfunc`) with the folder as its data, so
    `mlflow.pyfunc.load_model` and `mlflow models serve` answer chats with it. MLflow marks a failure
    midway FAILED."""
    from minimind.tracking.pyfunc import log_chat_model

    directory = Path(directory)
    if not any((directory / marker).is_file() for marker in MODEL_MARKERS):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; log a directory written by minimind.model.checkpoint.save_model "
                                "(or LoRA adapters written by minimind.model.lora.save_adapter)")
    _client()  # the store, set up
    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            return log_chat_model(directory, name)
    return log_chat_model(directory, name)


def register_logged_model(model_id: str, name: str, alias: str | None = None, tags: dict | None = None) -> "ModelVersion":
    """Register a LoggedModel (`log_model_dir`) as the next version of `name`, optionally under `alias`;
    a failure midway removes the version again, so a registered version is always complete."""
    if alias is not None:
        _check_alias(alias)
    client = _client()
    version = None
    try:
        version = mlflow.register_model(f"models:/{model_id}", name, tags={key: str(value) for key, value in (tags or {}).items()})
        if alias is not None:
            client.set_registered_model_alias(name, alias, version.version)
        return client.get_model_version(name, str(version.version))  # re-read: this one carries the aliases
    except BaseException:
        if version is not None:
            try:
                client.delete_model_version(name, str(version.version))
            except Exception as cleanup_error:  # report, but re-raise the error that caused the cleanup
                warnings.warn(f"could not undo the partial registration of {name} version {version.version}: {cleanup_error}")
        raise


def _mark_failed(model_id: str) -> None:
    try:
        mlflow.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except Exception as cleanup_error:
        warnings.warn(f"could not mark the LoggedModel {model_id} FAILED: {cleanup_error}")


def register_model_dir(
    directory: str | Path,
    name: str,
    run_id: str | None = None,
    alias: str | None = None,
    tags: dict | None = None,
) -> "ModelVersion":
    """Register a model directory as the next version of `name`: a LoggedModel (linked to `run_id`, default
    the active run) whose artifacts are the directory's files, then a registry version pointing at it.

    MLflow 3 cannot register `runs:/ID/dir` of plain files; the LoggedModel flow is the way that works.
    Arguments are checked before anything is logged, and a failure midway marks the LoggedModel FAILED
    and removes a version already created, so a registered version is always complete.
    """
    if alias is not None:
        _check_alias(alias)
    model_id = log_model_dir(directory, name, run_id)
    try:
        return register_logged_model(model_id, name, alias, tags)
    except BaseException:
        _mark_failed(model_id)
        raise


# --------------------------------------------------------------------------- plots, tables, provenance


def log_loss_curve(history: dict[str, list[tuple[int, float]]], artifact_file: str = "loss_curve.png") -> None:
    """One PNG with every metric's curve against the step, logged to the active run."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    for metric, points in history.items():
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, label=metric, marker="o" if len(points) == 1 else None)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    mlflow.log_figure(figure, artifact_file)


def start_parent_run(experiment_id: str, name: str, params: dict | None = None) -> str:
    """A run that groups others (they start with `parent_run_id` set to the id returned), left open
    while they run and closed by `end_parent_run`."""
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags={"git.commit": commit} if (commit := git_commit()) else None)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def end_parent_run(run_id: str, metrics: dict[str, float], tables: dict[str, list[dict]], failed: bool = False) -> None:
    """Log a parent run's summary metrics and tables (artifact file -> rows) and close it."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        for artifact_file, rows in tables.items():
            if rows:
                log_samples(rows, artifact_file)
        if failed:
            mlflow.end_run(status="FAILED")


def log_samples(rows: list[dict], artifact_file: str = "samples.json") -> None:
    """Rows (e.g. prompt / completion / score) as an MLflow table, viewable and comparable across runs."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
    mlflow.log_table(data=columns, artifact_file=artifact_file)


def git_commit() -> str | None:
    """HEAD of the checkout, or None outside one (installed package, no git binary)."""
    root = project_root()
    if not (root / ".git").exists():  # don't report an enclosing repository, such as a dotfiles repo in $HOME
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def log_data_file(path: str, digest: str, context: str) -> None:
    """Record a data file a run used as an MLflow dataset input (name, digest, source URI), which the run's
    Datasets panel shows and run searches can filter on."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a local path matches two equivalent source types; MLflow warns and picks one
        source = resolve_dataset_source(str(path))
    mlflow.log_input(MetaDataset(source, name=str(path).rstrip("/").rsplit("/", 1)[-1], digest=digest[:32]), context=context)


