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
    assert config["file_mounts"] == {"/home/ubuntu/minimind": "."}


def test_a_broken_cluster_config_is_refused():
    config = yaml.safe_load(CLUSTER.read_text())
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(Exception, match="node_config"):
        validate(config)
