"""cluster.yaml against Ray's own cluster-config schema, offline (no cloud credentials)."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config  # private API: wrapped here only

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = yaml.safe_load(CLUSTER.read_text())
    prepared = validate(config)
    nodes = prepared["available_node_types"]
    assert nodes["head"]["resources"].get("GPU", 0) == 0 and nodes["gpu_worker"]["resources"]["GPU"] == 1
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] >= 1
    assert any("pip install -e ." in command for command in config["setup_commands"])
    assert any("mlflow/server.sh" in command for command in config["head_start_ray_commands"])
    assert config["file_mounts"]["/home/ubuntu/minimind"] == "."


def test_the_head_trains_nothing():
    config = yaml.safe_load(CLUSTER.read_text())
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_every_node_has_a_tracking_uri_it_can_use():
    """Ray exports RAY_HEAD_IP to worker setup only: on the head it would read http://:5000."""
    config = yaml.safe_load(CLUSTER.read_text())
    head = [c for c in config["head_setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    workers = [c for c in config["worker_setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    assert head and "RAY_HEAD_IP" not in head[0] and "127.0.0.1" not in head[0]  # workers are sent the head's URI
    assert workers and "$RAY_HEAD_IP:5000" in workers[0]
    assert not any("MLFLOW_TRACKING_URI" in c for c in config["setup_commands"])


def test_token_authentication_is_on_and_nothing_listens_on_every_address():
    config = yaml.safe_load(CLUSTER.read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"  # one token, on every node
    text = CLUSTER.read_text()
    assert "0.0.0.0" not in text and "--dashboard-host" not in text


def test_gpu_workers_can_write_checkpoints_to_the_bucket():
    worker = yaml.safe_load(CLUSTER.read_text())["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_a_broken_cluster_config_is_refused():
    config = yaml.safe_load(CLUSTER.read_text())
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(Exception, match="node_config"):
        validate(config)
