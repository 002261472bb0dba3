"""cluster.yaml against Ray's own cluster-config schema, offline (no cloud credentials), and the shell
commands it gives each node, run here the way Ray's launcher runs them on a node."""

import copy
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
HEAD_IP = "10.0.1.23"  # what the launcher exports as RAY_HEAD_IP to the workers: the head's private address


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config  # private API: wrapped here only

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load():
    return yaml.safe_load(CLUSTER.read_text())


def usage() -> str:
    """The comment at the top of cluster.yaml: how a user brings the cluster up and submits a job."""
    lines = CLUSTER.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def as_launcher(command: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one command as Ray's launcher runs it over SSH: `bash --login -c -i 'source ~/.bashrc; ...'`."""
    from ray.autoscaler._private.command_runner import _with_interactive  # private API: wrapped here only

    return subprocess.run(" ".join(_with_interactive(command)), shell=True, executable="/bin/bash",
                          env={"HOME": str(home), "PATH": os.environ["PATH"], **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def writes_bashrc(commands: list[str]) -> list[str]:
    """The node-setup commands that only edit ~/.bashrc (not pip, which would install for real)."""
    return [c for c in commands if "~/.bashrc" in c and "pip" not in c]


def ray_start(commands: list[str]) -> str:
    return next(c for c in commands if "ray start" in c)


def with_ray_stub(command: str) -> str:
    """`command` with `ray` replaced by a shell function printing what `ray start` would run with."""
    stub = """ray() { printf 'uri=%s\\nauth=%s\\nargs=%s\\n' "$MLFLOW_TRACKING_URI" "$RAY_AUTH_MODE" "$*"; }"""
    return f"{stub}\n{command}"


def parse(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def own_private_address() -> str:
    try:
        address = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        address = []
    if not address:
        pytest.skip("`hostname -I` (Linux) is what the head runs; not available here")
    return address[0]


# --- Ray's schema ---------------------------------------------------------------------------------

def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = load()
    prepared = validate(config)
    nodes = prepared["available_node_types"]
    assert nodes["head"]["resources"].get("GPU", 0) == 0 and nodes["gpu_worker"]["resources"]["GPU"] == 1
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] >= 1
    assert any("pip install -e ." in command for command in config["setup_commands"])
    assert any("mlflow/server.sh" in command for command in config["head_start_ray_commands"])
    assert config["file_mounts"]["/home/ubuntu/minimind"] == "."


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "node_config"),
    (lambda c: c.update(file_mount=c.pop("file_mounts")), "file_mount"),
    (lambda c: c.update(head_node_type="cpu_head"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"), "integer"),
    (lambda c: c["provider"].update(security_group={"GroupName": "minimind", "IpRules": []}), "IpRules"),
])
def test_a_broken_cluster_config_is_refused(break_it, message):
    config = load()
    break_it(config)
    with pytest.raises(Exception, match=message):
        validate(config)


# --- 1. the head trains nothing -------------------------------------------------------------------

def test_the_head_trains_nothing():
    config = load()
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    start = ray_start(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start and "--num-gpus" not in start
    # A job's driver needs no CPU: `ray job submit` reserves none unless told (entrypoint_num_cpus
    # defaults to 0) and then runs the entrypoint on the head, which a 0-CPU head allows.
    assert "ray job submit" in usage() and "--entrypoint-num-cpus" not in usage()


def test_the_gpu_workers_are_what_the_driver_on_the_head_can_launch(tmp_path):
    """The driver decides to train on GPU from the launcher config the head keeps (~/ray_bootstrap_config.yaml),
    before any GPU node is up."""
    from minimind.driver.cluster import launchable_gpu_node_types

    prepared = validate(load())
    worker = prepared["available_node_types"]["gpu_worker"]
    assert worker["resources"] == {"CPU": 4, "GPU": 1} and worker["node_config"]["InstanceType"] == "g6.xlarge"
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(prepared))
    assert launchable_gpu_node_types(bootstrap) == ["gpu_worker"]


# --- 2. a tracking URI every node can use, also in the environment of `ray start` ------------------

def test_workers_log_to_the_heads_mlflow_server(tmp_path):
    """Ray exports RAY_HEAD_IP to worker initialization, setup and start commands."""
    from ray.autoscaler._private.util import with_envs, with_head_node_ip  # private API: wrapped here only

    prepared = validate(load())
    setup = writes_bashrc(prepared["initialization_commands"] + prepared["worker_setup_commands"])
    assert any("$RAY_HEAD_IP:5000" in c for c in setup)
    for command in with_head_node_ip(setup, HEAD_IP):
        done = as_launcher(command, tmp_path)
        assert done.returncode == 0, done.stderr
    for _ in range(2):  # setup runs again on every `ray up` / restarted node: still one URI
        as_launcher(with_head_node_ip(setup, HEAD_IP)[-1], tmp_path)
    assert (tmp_path / ".bashrc").read_text().count("MLFLOW_TRACKING_URI=") == 1

    start = with_envs([with_ray_stub(ray_start(prepared["worker_start_ray_commands"]))], {"RAY_HEAD_IP": HEAD_IP})[0]
    seen = parse(as_launcher(start, tmp_path).stdout)
    assert seen["uri"] == f"http://{HEAD_IP}:5000" and seen["auth"] == "token"
    assert f"--address={HEAD_IP}:6379" in seen["args"]


def test_a_worker_without_the_head_address_fails_setup_instead_of_logging_nowhere(tmp_path):
    prepared = validate(load())
    (tmp_path / ".bashrc").write_text("")
    failed = [as_launcher(c, tmp_path).returncode for c in writes_bashrc(prepared["worker_setup_commands"]) if "RAY_HEAD_IP" in c]
    assert failed and all(failed)
    assert "MLFLOW_TRACKING_URI" not in (tmp_path / ".bashrc").read_text()


def test_the_head_logs_to_its_own_mlflow_server_on_its_private_address(tmp_path):
    """No RAY_HEAD_IP on the head: `http://$RAY_HEAD_IP:5000` would read `http://:5000` there."""
    address = own_private_address()
    config = load()
    assert not any("MLFLOW_TRACKING_URI" in c for c in config["setup_commands"])
    prepared = validate(config)
    setup = writes_bashrc(prepared["initialization_commands"] + prepared["head_setup_commands"])
    assert setup and not any("RAY_HEAD_IP" in c or "127.0.0.1" in c for c in setup)  # workers are sent this URI
    for command in setup:
        done = as_launcher(command, tmp_path)
        assert done.returncode == 0, done.stderr

    seen = parse(as_launcher(with_ray_stub(ray_start(prepared["head_start_ray_commands"])), tmp_path).stdout)
    assert seen["uri"] == f"http://{address}:5000" and seen["auth"] == "token"

    # the MLflow server is started on that same address
    server = next(c for c in prepared["head_start_ray_commands"] if "mlflow/server.sh" in c)
    (tmp_path / "minimind").mkdir()
    stub = """setsid() { printf 'host=%s\\nargs=%s\\n' "$HOST" "$*" > ~/server.seen; }"""
    as_launcher(f"{stub}\n{server}\nwait", tmp_path)
    seen = parse((tmp_path / "server.seen").read_text())
    assert seen["host"] == address and seen["args"] == "nohup bash mlflow/server.sh"


def test_the_mlflow_server_listens_where_it_is_told_and_accepts_the_workers(tmp_path):
    """mlflow/server.sh binds $HOST (127.0.0.1 unless told); MLflow's host-header check admits private
    addresses (EC2: 10.x, 172.31.x) and localhost (an SSH tunnel), so the workers' requests are served."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header  # private API

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mlflow").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "bin" / "mlflow").chmod(0o755)
    script = tmp_path / "server.sh"
    script.write_text((ROOT / "mlflow" / "server.sh").read_text())
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    told = subprocess.run(["bash", str(script)], env={**env, "HOST": HEAD_IP}, capture_output=True, text=True, timeout=30)
    assert f"--host {HEAD_IP} --port 5000" in told.stdout, told.stderr
    default = subprocess.run(["bash", str(script), "5001"], env=env, capture_output=True, text=True, timeout=30)
    assert "--host 127.0.0.1 --port 5001" in default.stdout, default.stderr

    allowed = get_default_allowed_hosts()
    assert all(is_allowed_host_header(allowed, host) for host in (f"{HEAD_IP}:5000", "172.31.7.9:5000", "127.0.0.1:5000"))
    assert not is_allowed_host_header(allowed, "203.0.113.9:5000")


# --- 3. Ray token authentication ------------------------------------------------------------------

def test_token_authentication_is_on_on_every_node_with_one_token():
    config = load()
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])  # every shell, as Ray's docs do
    # `ray start` with token auth and no token refuses to start: the local token goes to every node
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(c.startswith("chmod 600 ~/.ray/auth_token") for c in config["setup_commands"])
    text = usage()
    assert text.index("ray get-auth-token --generate") < text.index("ray up cluster.yaml")
    assert text.index("RAY_AUTH_MODE=token") < text.index("ray job submit")


# --- 4. nothing open to the world -----------------------------------------------------------------

def test_dashboard_and_mlflow_are_not_open_to_the_world():
    config = load()
    text = CLUSTER.read_text()
    assert "0.0.0.0" not in text and "--dashboard-host" not in text  # dashboard: Ray's default, localhost
    assert "ray dashboard cluster.yaml" in usage()
    server = next(c for c in config["head_start_ray_commands"] if "mlflow/server.sh" in c)
    assert "HOST=$(hostname -I" in server  # the head's private address
    # the launcher's own security group (SSH + the cluster's own traffic) for both node types
    assert not any("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values())
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


# --- 5. GPU workers write checkpoints to the bucket -----------------------------------------------

def test_both_node_types_name_an_instance_profile():
    nodes = load()["available_node_types"]
    for name in ("gpu_worker", "head"):  # the head must be allowed to pass the workers' role
        arn = nodes[name]["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn
    assert nodes["head"]["node_config"]["IamInstanceProfile"] != nodes["gpu_worker"]["node_config"]["IamInstanceProfile"]


def test_workers_reach_s3_through_pyarrow_alone():
    """Ray Train and minimind.storage open s3:// with pyarrow's native S3 filesystem (credentials from
    the instance profile): the workers need no boto3 or s3fs, only what `pip install -e .` brings."""
    import pyarrow.fs

    assert pyarrow.fs.S3FileSystem is not None  # built with S3 support (PyPI wheels are)
    config = load()
    assert any("pip install -e ." in c for c in config["setup_commands"])  # head and workers alike


# --- 6. how it is used ----------------------------------------------------------------------------

def submitted_command() -> list[str]:
    """The `ray job submit ...` of the usage comment, continuation lines joined, as argv."""
    lines = [line.lstrip("#").strip() for line in usage().splitlines()]
    command = []
    for line in lines[next(i for i, line in enumerate(lines) if line.startswith("ray job submit")):]:
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))


def test_the_usage_comment_submits_a_job_that_works_on_this_cluster():
    """Workers share no disk with the driver: checkpoints and data are storage URIs."""
    text = usage()
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray down cluster.yaml"):
        assert step in text
    argv = submitted_command()
    assert argv[:3] == ["ray", "job", "submit"] and "--working-dir" in argv
    assert argv[argv.index("--storage-path") + 1].startswith("s3://")
    assert argv[argv.index("--data") + 1].startswith("s3://")
    assert (ROOT / argv[argv.index("--") + 2]).is_file()  # python jobs/...py
