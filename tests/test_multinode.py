"""Two Ray nodes on one machine, the way a real cluster is laid out: the driver's disk is its own.

The head runs with `--num-cpus 0`, so every training worker lands on the second node. That node runs in
its own mount namespace with tmpfs over the driver's checkout (only the installed environment and the
`minimind` package are bound back, as a worker node would have them installed), over the driver's
project home (checkpoints, MLflow store) and over the demo cache. MLflow is an `mlflow server` on
loopback; one folder both nodes see is Ray storage. A worker that opened a driver path would fail.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Run as root inside `unshare --mount`: hide the checkout (keeping the venv and the package), then hide
# every folder named in $BLIND, then start the Ray worker node.
BLIND_NODE = r"""
set -e
mkdir -p "$KEEP/venv" "$KEEP/package"
mount --bind "$ROOT/.venv" "$KEEP/venv"
mount --bind "$ROOT/minimind" "$KEEP/package"
mount -t tmpfs tmpfs "$ROOT"
mkdir -p "$ROOT/.venv" "$ROOT/minimind"
mount --move "$KEEP/venv" "$ROOT/.venv"
mount --move "$KEEP/package" "$ROOT/minimind"
for folder in $BLIND; do mount -t tmpfs tmpfs "$folder"; done
exec "$@"
"""

DRIVER = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from minimind.driver.runner import run_stage
    from minimind.training.configs import PretrainConfig, SFTConfig, VLMConfig

    quick = dict(max_steps=2, checkpoint_every=2, log_every=1, eval_limit=4, batch_size=4, seq_len=128, storage_path="{storage}")
    registered = {{}}
    # no DPO stage of its own: the sweep's trials below train DPO on the blind node, through the same run_stage
    for name, config, starts_from in [("pretrain", PretrainConfig(preset="tiny", **quick), None),
                                      ("sft", SFTConfig(**quick), "pretrain"),
                                      ("vlm_pretrain", VLMConfig(**quick), "sft")]:
        result = run_stage(replace(config, init=registered.get(starts_from)), name)
        registered[name] = result.model_uri
        print("REGISTERED", name, result.model_uri, flush=True)

    sys.path.insert(0, "{root}/tune")
    import dpo_beta  # its trials, and their Ray Train workers, run on the blind node too (the head has no CPUs)

    best, rows = dpo_beta.main(["--grid", "0.1", "0.5", "--init", registered["sft"], "--steps", "2", "--eval-limit", "4",
                                "--storage-path", "{storage}/sweeps", "--name", "blind-sweep", "--cpus-per-trial", "1"])
    print("SWEEP", len(rows), best, flush=True)
""")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{url} did not come up:\n" + log.read_text()[-3000:]) from None
            time.sleep(0.5)


def _node_ports() -> list[str]:
    """Every fixed default port of a Ray node, moved away from the other Ray instances on this machine."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # the process group of this cluster's node only
    process.wait(timeout=60)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a blind node")
def test_every_input_reaches_a_worker_node_that_cannot_see_the_driver_disk(tmp_path):
    home, demo, shared, keep = (
        Path(tempfile.mkdtemp(prefix=f"mn-{name}-", dir="/tmp")) for name in ("home", "demo", "shared", "keep")
    )
    ray_temp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MINIMIND_HOME": str(home),
        "MINIMIND_DEMO_DIR": str(demo),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # as `fast_train_polls`, on this cluster's every node and its driver
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    gcs, mlflow_port = _free_port(), _free_port()
    processes = []
    try:
        mlflow_log = tmp_path / "mlflow.log"
        processes.append(
            _start(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{home}/mlflow.db",
                    "--artifacts-destination",
                    str(home / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "-w",
                    "1",
                ],
                mlflow_log,
                env,
            )
        )
        processes.append(
            _start(
                [
                    str(BIN / "ray"),
                    "start",
                    "--head",
                    "--block",
                    f"--port={gcs}",
                    "--num-cpus=0",
                    "--include-dashboard=false",
                    f"--temp-dir={ray_temp}",
                    f"--ray-client-server-port={_free_port()}",
                    *_node_ports(),
                ],
                tmp_path / "head.log",
                env,
            )
        )
        blind = {**env, "ROOT": str(ROOT), "KEEP": str(keep), "BLIND": f"{home} {demo}"}
        processes.append(
            _start(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    BLIND_NODE,
                    "blind-node",
                    str(BIN / "ray"),
                    "start",
                    "--block",
                    f"--address=127.0.0.1:{gcs}",
                    "--num-cpus=2",
                    *_node_ports(),
                ],
                tmp_path / "worker.log",
                blind,
            )
        )
        _wait_for(f"http://127.0.0.1:{mlflow_port}/health", processes[0], mlflow_log)

        driver_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER.format(root=ROOT, storage=shared)],
            env=driver_env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        output = driver.stdout + driver.stderr
        assert driver.returncode == 0, output[-6000:] + "\nworker node:\n" + (tmp_path / "worker.log").read_text()[-2000:]
        for name, registered in (
            ("pretrain", "minimind-pretrain"),
            ("sft", "minimind-sft"),
            ("vlm_pretrain", "minimind-vlm-pretrain"),
        ):
            assert f"REGISTERED {name} models:/{registered}/1" in output
        assert "inputs for the workers staged under" in output
        assert "SWEEP 2 models:/minimind-dpo/1" in output  # two trials; the best registered from its LoggedModel

        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        run_id = client.get_model_version("minimind-sft", "1").run_id
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [
            1,
            2,
        ]  # logged by the worker, through the server
        assert not any(shared.rglob("vision/config.json")), "no copy of the tower in any checkpoint"
    finally:
        for process in reversed(processes):
            _stop(process)
        for folder in (home, demo, shared, keep):
            shutil.rmtree(folder, ignore_errors=True)
