"""Before `ray up`: does every node of a cluster config answer, and is everything it copies there?

    python cluster/check.py cluster/ray_cluster.onprem.yaml

Checks, from the machine you run `ray up` on, what `ray up` needs and would otherwise report late
or at length (it retries an unreachable head for 15 minutes):
- every local file that `file_mounts` copies exists (among them the Ray auth token,
  ~/.ray/auth_token, that the nodes start with: `ray get-auth-token --generate` makes it);
- rsync is installed here;
- on your own machines (provider type local): every host in head_ip and worker_ips takes an SSH
  login with the config's user, key and proxy command, non-interactively, and has rsync.
Prints one line per problem and exits with status 1, or one "ok" line and 0. Cloud configs (AWS,
GCP) have no hosts before `ray up`: only the local files are checked.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SSH_TIMEOUT_S = 10
TOKEN_REMOTE = "~/.ray/auth_token"


def _local_path(path: str) -> Path:
    """As ray up reads it: ~ expanded, relative to the directory ray up runs in."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path.cwd() / p


def check_files(config: dict) -> list[str]:
    problems = []
    for remote, local in (config.get("file_mounts") or {}).items():
        path = _local_path(str(local))
        if path.exists():
            continue
        if remote == TOKEN_REMOTE or path.name == "auth_token":
            problems.append(f"no Ray auth token at {local} ({path}): run `ray get-auth-token --generate` once; "
                            f"ray up copies it to every node, which start Ray with RAY_AUTH_MODE=token")
        else:
            problems.append(f"file_mounts: {local} ({path}), to be copied to {remote} on every node, does not exist "
                            f"(run ray up from the repository root)")
    if shutil.which("rsync") is None:
        problems.append("no rsync on this machine: ray up copies the repository with it (apt-get install rsync)")
    return problems


def ssh_command(auth: dict, host: str, remote_cmd: str) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", "-o", "StrictHostKeyChecking=no",
           "-o", f"UserKnownHostsFile={os.devnull}", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
    if auth.get("ssh_private_key"):
        cmd += ["-i", os.path.expanduser(str(auth["ssh_private_key"]))]
    if auth.get("ssh_proxy_command"):
        cmd += ["-o", f"ProxyCommand={auth['ssh_proxy_command']}"]
    return cmd + [f"{auth['ssh_user']}@{host}", remote_cmd]


def check_host(auth: dict, role: str, host: str) -> str | None:
    user, key = auth.get("ssh_user", "?"), auth.get("ssh_private_key")
    who = f"{role} {host}"
    if key and not Path(os.path.expanduser(str(key))).is_file():
        return f"{who}: ssh_private_key {key} does not exist on this machine"
    try:
        done = subprocess.run(ssh_command(auth, host, "command -v rsync >/dev/null || echo NO-RSYNC"),
                              capture_output=True, text=True, timeout=3 * SSH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{who}: no SSH answer within {3 * SSH_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"ssh exited with status {done.returncode}"
        return f"{who}: cannot log in over SSH as {user}" + (f" with {key}" if key else "") + f": {why}"
    if "NO-RSYNC" in done.stdout:
        return f"{who}: no rsync on the host: ray up copies the repository with it (apt-get install rsync there)"
    return None


def check_hosts(config: dict) -> tuple[list[str], int]:
    provider, auth = config.get("provider") or {}, config.get("auth") or {}
    if provider.get("type") != "local":
        return [], 0
    if not auth.get("ssh_user"):
        return ["auth: no ssh_user"], 0
    hosts = [("head", provider.get("head_ip"))] + [("worker", ip) for ip in provider.get("worker_ips") or []]
    hosts = [(role, str(ip)) for role, ip in hosts if ip]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda h: check_host(auth, *h), hosts))
    return [r for r in results if r], len(hosts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a cluster config (ray_cluster.yaml, cluster/ray_cluster.*.yaml)")
    args = parser.parse_args(argv)
    import yaml

    path = Path(args.config)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"{path}: cannot read the cluster config: {str(exc).splitlines()[0]}")
        return 1
    if not isinstance(config, dict):
        print(f"{path}: not a cluster config (a YAML mapping)")
        return 1
    problems = check_files(config)
    host_problems, hosts = check_hosts(config)
    problems += host_problems
    for line in problems:
        print(line)
    if problems:
        return 1
    print(f"ok: {path}: local files present" + (f", {hosts} host(s) answer over SSH" if hosts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
