"""The model registry: `models:/` and `runs:/` references resolved to model folders (LoRA adapters merged
onto their base on request), pinned to exact versions, and LoggedModels registered as versions with
aliases and tags."""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

from minimind.model.lora import LoRAConfig, merge_adapter_dir
from minimind.tracking.store import mlflow_client

CONFIG_NAME = "config.json"  # the file that marks a model directory (see minimind.model.checkpoint)
ADAPTER_CONFIG_NAME = "adapter_config.json"  # ... and a LoRA adapter directory (see minimind.model.lora)
MODEL_MARKERS = (CONFIG_NAME, ADAPTER_CONFIG_NAME)
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
    found = sorted(
        {path.parent for marker in MODEL_MARKERS for path in root.rglob(marker)},
        key=lambda folder: (len(folder.parts), str(folder)),
    )
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
        found = _model_version(mlflow_client(), reference)
        return f"models:/{found.name}/{found.version}"
    return reference


def recorded_lineage(run_name: str) -> dict[str, str]:
    """The exact inputs (`lineage.*` tags) an earlier MLflow run of this Ray run name resolved, for --resume."""
    client = mlflow_client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`ray.run_name` = '{run_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return next(
        (
            {k: v for k, v in run.data.tags.items() if k.startswith("lineage.")}
            for run in runs
            if any(k.startswith("lineage.") for k in run.data.tags)
        ),
        {},
    )


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
        client = mlflow_client()
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
            found = _model_version(mlflow_client(), reference)
            tags |= {"source.name": found.name, "source.version": str(found.version)}
    elif reference.startswith("runs:/"):
        tags["source.run_id"] = reference[len("runs:/") :].split("/", 1)[0]
    return tags


def check_alias(alias: str) -> None:
    if not _ALIAS_PATTERN.match(alias):
        raise ValueError(f"alias {alias!r} is not allowed: MLflow aliases use only letters, digits, '_' and '-'")
    if _RESERVED_ALIAS.match(alias):
        raise ValueError(
            f"alias {alias!r} is reserved by MLflow ('latest' always means the newest version and 'v<N>' version N); "
            "pick another name such as 'best' or 'candidate'"
        )


def register_logged_model(model_id: str, name: str, alias: str | None = None, tags: dict | None = None) -> "ModelVersion":
    """Register a LoggedModel (`log_model_dir`) as the next version of `name`, optionally under `alias`;
    a failure midway removes the version again, so a registered version is always complete."""
    if alias is not None:
        check_alias(alias)
    client = mlflow_client()
    version = None
    try:
        version = mlflow.register_model(
            f"models:/{model_id}", name, tags={key: str(value) for key, value in (tags or {}).items()}
        )
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


def mark_failed(model_id: str) -> None:
    try:
        mlflow.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except Exception as cleanup_error:
        warnings.warn(f"could not mark the LoggedModel {model_id} FAILED: {cleanup_error}")
