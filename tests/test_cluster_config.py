"""The shipped cluster configs pass Ray's own cluster-config validation (schema + provider defaults)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SETUP = "bash ~/distill-sweeps/cluster/setup_node.sh"
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
    assert config["setup_commands"][0] == SETUP


def test_configs_share_the_node_setup_and_token_auth():
    """One node setup (cluster/setup_node.sh installs requirements.txt, the project, ray[default]) and
    the same file mounts and Ray start commands, with token auth, in all three configs; the on-prem
    one is brought up for real by tests/test_cluster_onprem.py (slow)."""
    configs = [yaml.safe_load(p.read_text()) for p in CONFIGS]
    for config in configs:
        assert config["setup_commands"][0] == SETUP
        assert config["file_mounts"] == {"~/distill-sweeps": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
        for key in ("head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter"):
            assert config[key] == configs[0][key], key
    starts = [c for c in configs[0]["head_start_ray_commands"] + configs[0]["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    script = (REPO / "cluster" / "setup_node.sh").read_text()
    assert "requirements.txt" in script and "ray[default]==" in script and "RAY_AUTH_MODE=token" in script
    subprocess.run(["bash", "-n", str(REPO / "cluster" / "setup_node.sh")], check=True)


def test_check_reports_a_missing_token_in_one_line(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    check = [sys.executable, "cluster/check.py", "ray_cluster.yaml"]
    done = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and lines[0].startswith("no Ray auth token at ~/.ray/auth_token"), done.stdout
    assert "ray get-auth-token --generate" in lines[0] and len(lines) == 1 + (shutil.which("rsync") is None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    if shutil.which("rsync"):
        done = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "ok: ray_cluster.yaml: local files present\n", done.stdout


def test_validation_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config["available_node_types"]["worker.gpu"]["min_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
