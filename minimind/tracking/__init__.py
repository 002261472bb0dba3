"""MLflow for MiniMind: where the store lives, registering model directories, resolving `models:/` URIs,
and the plots and tables a training run logs. The project's only MLflow code; jobs call it from rank 0.

A model is a plain directory (`model.safetensors + config.json + tokenizer files`). It is registered as
an MLflow 3 LoggedModel whose artifacts are that directory, so `models:/minimind-sft/latest` downloads
back to the same directory that was saved, with no MLflow flavour or pickling in between.

The package's parts: `store` (where the store lives), `registry` (resolving, pinning and registering
models), `runs` (what a run logs besides metrics) and `pyfunc` (a model folder as an MLflow pyfunc chat
model, logged and registered). Their public names are re-exported here: `tracking.resolve_model(...)`.
"""

from __future__ import annotations

from minimind.tracking.pyfunc import log_model_dir, register_model_dir
from minimind.tracking.registry import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    MODEL_MARKERS,
    check_alias,
    first_line,
    model_source,
    pin,
    recorded_lineage,
    register_logged_model,
    resolve_model,
    resolved_model,
)
from minimind.tracking.runs import end_parent_run, git_commit, log_data_file, log_loss_curve, log_samples, start_parent_run
from minimind.tracking.store import configure, default_tracking_uri, in_ray_package, local_store_path, project_root

__all__ = [
    "ADAPTER_CONFIG_NAME", "check_alias", "CONFIG_NAME", "configure", "default_tracking_uri", "end_parent_run", "first_line",
    "git_commit", "in_ray_package", "local_store_path", "log_data_file", "log_loss_curve", "log_model_dir", "log_samples",
    "MODEL_MARKERS", "model_source", "pin", "project_root", "recorded_lineage", "register_logged_model",
    "register_model_dir", "resolve_model", "resolved_model", "start_parent_run",
]


def __getattr__(name: str):
    # `tracking.PROJECT_ROOT` is computed on access, so a `$MINIMIND_HOME` set after import still counts.
    if name == "PROJECT_ROOT":
        return project_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


