"""The shipped cluster configs pass Ray's own cluster-config validation (schema + provider defaults)."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "ray_cluster.yaml", REPO / "cluster" / "ray_cluster.gcp.yaml", REPO / "cluster" / "ray_cluster.onprem.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_validates(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))


def test_aws_config_shape():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = config["available_node_types"]
    head, worker = types[config["head_node_type"]], types["worker.gpu"]
    assert head["node_config"]["InstanceType"].startswith("m")  # CPU head
    assert worker["node_config"]["InstanceType"].startswith("g") and worker["min_workers"] <= worker["max_workers"]
    assert any("requirements.txt" in cmd for cmd in config["setup_commands"])


def test_validation_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config["available_node_types"]["worker.gpu"]["min_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
