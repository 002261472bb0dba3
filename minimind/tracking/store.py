"""Where MiniMind's MLflow store lives: the project's folder, the tracking URI (a local SQLite store
unless MLFLOW_TRACKING_URI names a server), and a client on it whose tables exist."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    pass

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # minimind/


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


def sqlite_path(uri: str) -> Path | None:
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
        database = sqlite_path(uri)
        if database is None:
            return uri
        query = uri.partition("?")[2]
        return f"sqlite:///{database}" + (f"?{query}" if query else "")
    store = project_root() / "mlflow" / "store"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"  # the path is absolute, so this reads sqlite:////...


def local_store_path(uri: str | None = None) -> Path | None:
    """The database file when the tracking URI is a local SQLite store (None for a tracking server)."""
    return sqlite_path(uri or mlflow.get_tracking_uri())


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to its database file, by absolute path; otherwise (the
    default) they would land relative to whichever process created the experiment. A tracking server
    decides for itself (None)."""
    database = sqlite_path(uri)
    return str(database.parent / "artifacts") if database else None


def configure(experiment: str = "minimind") -> str:
    """Point MLflow at the project's store, make `experiment` active (creating it if missing) and return
    its id. `MLFLOW_TRACKING_URI` is exported so subprocesses and Ray workers use the same store."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = open_store(uri)
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


def open_store(uri: str) -> MlflowClient:
    """A client whose store exists. MLflow creates a new SQLite store's tables on first use, and two
    processes doing that at once fail or half-migrate the file ("table ... already exists"), so the
    first use happens under a lock file next to the database."""
    database = sqlite_path(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri)
    with FileLock(f"{database}.lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates or migrates the tables if needed
    return client


def mlflow_client() -> MlflowClient:
    """A client on the project's store; without this, an unconfigured process would silently create
    `./mlflow.db` in its cwd (MLflow's default) and find no models there."""
    if not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(default_tracking_uri())
    return open_store(mlflow.get_tracking_uri())


