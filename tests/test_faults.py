"""Failures lose nothing: a job SIGKILLed with its Ray instance continues with --resume; two jobs
registering into one MLflow store at once both land. Jobs run as real `python jobs/pretrain.py`
processes. (A killed worker and a half-written checkpoint: tests/test_train_jobs.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "128",
    "--eval-limit",
    "4",
    "--log-every",
    "1",
    "--cpus-per-worker",
    "1",
]


@pytest.fixture
def env(ray_cluster, tmp_path):
    import ray

    return {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MINIMIND_HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PYTHONUNBUFFERED": "1",
    }


def job(env, *flags, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "pretrain.py"), *TINY, *flags], env=env, cwd=ROOT, **popen)


def client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_a_killed_job_continues_with_resume_and_registers_once(env, tmp_path):
    """The job on a Ray instance of its own, as `python jobs/pretrain.py` starts it: SIGKILL the driver and
    everything it started, then run it again with --resume."""
    env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
    storage = tmp_path / "ray"
    log = (tmp_path / "first.log").open("w")
    first = job(
        env,
        "--max-steps",
        "40",
        "--checkpoint-every",
        "5",
        "--storage-path",
        str(storage),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while len(list(storage.glob("*/checkpoint_*"))) < 2:  # then the first checkpoint is complete and registered
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray instance it started, at once
    first.wait()
    resumed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "pretrain.py"),
            *TINY,
            "--max-steps",
            "40",
            "--checkpoint-every",
            "5",
            "--storage-path",
            str(storage),
            "--resume",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    versions = client(env).search_model_versions("name='minimind-pretrain'")
    assert len(versions) == 1  # the killed run registered nothing, the resumed one once
    steps = [m.step for m in client(env).get_metric_history(versions[0].run_id, "train/loss")]
    assert steps[0] > 1 and steps[0] % 5 == 1 and steps[-1] == 40, resumed.stdout[-4000:]  # continued after a checkpoint
    assert steps == list(range(steps[0], 41))


def test_two_jobs_registering_into_one_store_at_once_both_land(env, tmp_path):
    jobs = [
        job(
            env,
            "--max-steps",
            "3",
            "--checkpoint-every",
            "3",
            "--experiment",
            f"parallel-{i}",
            "--seed",
            str(i),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in jobs]
    assert all(process.returncode == 0 for process in jobs), "\n".join(o[-2000:] for o in outputs)
    versions = client(env).search_model_versions("name='minimind-pretrain'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    experiments = {client(env).get_experiment(client(env).get_run(v.run_id).info.experiment_id).name for v in versions}
    assert experiments == {"parallel-0", "parallel-1"}  # each version points at its own job's run
    for version in versions:
        files = {a.path for a in client(env).list_artifacts(version.run_id)}
        assert "loss_curve.png" in files
    assert json.dumps(sorted(o.count("registered models:/minimind-pretrain/") for o in outputs)) == "[1, 1]"
