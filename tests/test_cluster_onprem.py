"""`ray up` for real: the on-prem cluster config brought up over SSH on this machine (slow, minutes).

What a user with a lab server does (README, "On your own machines (on-prem)"), on 127.0.0.1:

    ray get-auth-token --generate
    python cluster/check.py CONFIG
    ray up -y CONFIG
    ray exec CONFIG 'ray status'
    ray dashboard CONFIG &
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python sweeps/run.py --grid d_coef --preset smoke --address auto --out OUT
    RAY_AUTH_MODE=token ray job logs ID;  ray rsync-down CONFIG OUT/ LOCAL/
    ray down -y CONFIG

CONFIG is a copy of cluster/ray_cluster.onprem.yaml with only the IPs (head 127.0.0.1, no
workers), the SSH port (`ssh_proxy_command: nc %h PORT`), the user and the key changed, and Ray's
ports (GCS, dashboard, dashboard agent, client server) chosen free; the setup command is the
shipped one. The "lab server" is this machine seen through:

- a throwaway unix account (useradd; removed at teardown, /etc/passwd and /etc/group checked back
  to what they were) as the config's ssh_user, its home in the test's temp dir. `ray stop`, which
  `ray up` and `ray down` run on the head, stops only that account's processes: a root process
  named `raylet`, started by the test, must survive both;
- Debian's sshd on a free 127.0.0.1 port, with a host key, config, pid file and log of its own in
  the temp dir, started by the test and stopped by PID (with the session processes it forked);
- when needed, a mount namespace of sshd's own (unshare): /run/sshd, sshd's privilege separation
  directory, on a private tmpfs, and this machine's Python, when it lives in a home the account
  cannot enter (/root/.pyenv), bound read-only into a view of that home. The account's python3 is
  then this machine's, requirements installed, and nothing of it can change: setup_node.sh
  installs into the account's own virtualenv;
- the account's ~/.bashrc puts that python3 first on the PATH, TMPDIR in the temp dir (Ray's
  session files) and passes on this machine's pip settings (index, certificates).

The local side (ray up, ray job, ray down) is this Python, plus ray[default] for the jobs CLI in a
virtualenv of the test's own when it lacks it (README: the user installs it). It runs with HOME and
TMPDIR in the temp dir: the test's key, the auth token, ray up's cluster state and config cache
live there, and ssh never writes a known_hosts (Ray passes UserKnownHostsFile=/dev/null); the
user's ~/.ssh and ~/.ray are checked unchanged. What goes wrong is checked to come out in one line: an unreachable head and a missing
token (cluster/check.py), a failing setup command (setup_node.sh, through ray up), a job submitted
without the token (Ray's own 401 line).

    python -m pytest -q -m slow tests/test_cluster_onprem.py

Needs root on Linux. openssh-server, rsync and netcat-openbsd are installed with apt-get when
missing, only where /usr/sbin/policy-rc.d keeps the SSH service from starting (a container);
otherwise, or when that fails, the test skips with the reason.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "cluster" / "ray_cluster.onprem.yaml"
SSHD = "/usr/sbin/sshd"
TOOLS = {SSHD: "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "rsync": "rsync",
         "nc": "netcat-openbsd"}
JOB_TIMEOUT_S = 1500
RAY_PROCESS_WORDS = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard", "log_monitor", "monitor.py",
                     "runtime_env", "ray.util.client", "ray/_private", "ray.scripts", "sweeps/run.py")


# --- processes, by PID only -------------------------------------------------------------------

def _proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pids_of_uid(uid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _proc_uid(int(e.name)) == uid]


def _kill(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_tree(pid: int) -> None:
    _kill([pid] + _children(pid))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _plain(text: str) -> str:
    """Without the terminal colours Ray's CLI writes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _one_line(lines: list[str], needle: str) -> str:
    hits = [ln for ln in lines if needle in ln]
    assert len(hits) == 1, f"expected one line with {needle!r}, got {hits}"
    return hits[0]


# --- the harness --------------------------------------------------------------------------------

class OnPrem:
    """The lab server (account, sshd), the user's machine (HOME, token, key) and the config copy."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dso-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.base.chmod(0o711)
        self.logs = self.base / "logs"
        self.logs.mkdir()
        self.user = f"dsw{secrets.token_hex(3)}"
        self.home = self.base / "home"
        self.node_tmp = self.base / "t"
        self.client_home = self.base / "client"
        self.client_tmp = self.base / "client-tmp"
        self.sshd_dir = self.base / "sshd"
        self.key = self.client_home / ".ssh" / "id_ed25519"
        self.config = self.base / "ray_cluster.onprem.test.yaml"
        self.ssh_port = _free_port()
        self.ports = {name: _free_port() for name in ("gcs", "dashboard", "agent", "client")}
        self.local_dashboard = _free_port()
        self.uid: int | None = None
        self.sshd: subprocess.Popen | None = None
        self.sentinel: subprocess.Popen | None = None
        self.forwarder: subprocess.Popen | None = None
        self.cluster_up = False
        self.control_dirs: list[Path] = []
        self.etc_before = {p: Path(p).read_bytes() for p in ("/etc/passwd", "/etc/group")}
        self.user_state_before = self._user_state()
        ray_bin = Path(sys.executable).parent / "ray"
        self.ray = str(ray_bin) if ray_bin.exists() else "ray"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(self.client_home), TMPDIR=str(self.client_tmp), RAY_USAGE_STATS_ENABLED="0")
        self.step = 0

    # the user's own files that must stay as they were
    @staticmethod
    def _user_state() -> dict:
        state = {}
        for d in (Path("~/.ssh").expanduser(), Path("~/.ray").expanduser()):
            state[str(d)] = sorted((str(p), p.stat().st_mtime_ns) for p in d.rglob("*")) if d.exists() else None
        return state

    def run(self, args: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> tuple[int, str]:
        """Run a command to the end (its whole process tree killed by PID on timeout); (status, output)."""
        self.step += 1
        log = self.logs / f"{self.step:02d}-{Path(args[0]).name}-{Path(args[1]).name if len(args) > 1 else ''}.log"
        t0 = time.monotonic()
        proc = subprocess.Popen(args, cwd=cwd, env=env or self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            out, _ = proc.communicate()
            log.write_text(out)
            raise AssertionError(f"{shlex.join(args)} ran past {timeout} s; its output: {log}\n{out[-3000:]}")
        log.write_text(f"$ {shlex.join(args)}\n{out}\n[exit {proc.returncode} after {time.monotonic() - t0:.0f} s]\n")
        print(f"[{time.monotonic() - t0:6.1f} s] exit {proc.returncode}: {shlex.join(args)[:160]}", flush=True)
        return proc.returncode, out

    def ray_cmd(self, *args: str, timeout: float = 300, env: dict | None = None) -> tuple[int, str]:
        rc, out = self.run([self.ray, *args], timeout=timeout, env=env)
        return rc, _plain(out)

    # --- set up ---
    def ensure_tools(self) -> str | None:
        missing = sorted({pkg for tool, pkg in TOOLS.items() if not (shutil.which(tool) or Path(tool).exists())})
        if not missing:
            return None
        policy = Path("/usr/sbin/policy-rc.d")
        quiet = policy.exists() and subprocess.run([str(policy)], capture_output=True).returncode == 101
        if not shutil.which("apt-get") or not quiet or os.environ.get("DISTILL_TEST_NO_APT"):
            return (f"{', '.join(missing)} missing (apt-get install -y {' '.join(missing)}); the test installs them "
                    "itself only where policy-rc.d keeps the SSH service from starting")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", *missing]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                return f"cannot install {', '.join(missing)}: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        return None

    def make_client(self) -> None:
        """The user's machine needs ray[default] for `ray job` (README); if this Python lacks it, a
        virtualenv of the test's own (seeing this Python's packages) adds it, and its `ray` is used."""
        try:
            import aiohttp  # noqa: F401
            import grpc  # noqa: F401
            return
        except ImportError:
            pass
        import ray

        venv = self.base / "client-venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True, capture_output=True)
        rc, out = self.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--cache-dir", str(self.base / "pip-cache"), f"ray[default]=={ray.__version__}"],
                           timeout=900, env=dict(os.environ))
        if rc != 0:
            pytest.skip(f"cannot install ray[default]=={ray.__version__} for the jobs CLI: {out.strip().splitlines()[-1:]}")
        wrapper = venv / "bin" / "ray"
        wrapper.write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -m ray.scripts.scripts "$@"\n')
        wrapper.chmod(0o755)
        self.ray = str(wrapper)

    def python_view(self) -> tuple[Path, Path] | None:
        """(home the account cannot enter, its child holding this Python), or None if it can reach it."""
        prefix = Path(sys.base_prefix).resolve()
        for parent in reversed(prefix.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                return parent, parent / prefix.relative_to(parent).parts[0]
        return None

    def add_user(self) -> None:
        subprocess.run(["useradd", "--create-home", "--home-dir", str(self.home), "--shell", "/bin/bash",
                        "--password", "*", "--user-group", "--comment", "distill-sweeps on-prem test", self.user],
                       check=True, capture_output=True)
        self.uid = int(subprocess.run(["id", "-u", self.user], capture_output=True, text=True, check=True).stdout)
        self.home.chmod(0o755)
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        self.node_tmp.mkdir(mode=0o700)
        # the lab server's Python (with the requirements) and pip settings; Ray's session files in the temp dir
        passed = {k: v for k, v in os.environ.items()
                  if k.startswith("PIP_") or k in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                                                   "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                                                   "http_proxy", "https_proxy", "no_proxy")}
        lines = ["", "# tests/test_cluster_onprem.py: this machine's Python first, temp files in the test's dir",
                 f"export PATH={shlex.quote(str(Path(sys.base_prefix).resolve() / 'bin'))}:$PATH",
                 f"export TMPDIR={shlex.quote(str(self.node_tmp))}",
                 *(f"export {k}={shlex.quote(v)}" for k, v in sorted(passed.items())), ""]
        with open(self.home / ".bashrc", "a") as f:
            f.write("\n".join(lines))
        for path in (ssh_dir, self.node_tmp):
            os.chown(path, self.uid, self.uid)

    def make_keys(self) -> None:
        self.sshd_dir.mkdir()
        (self.client_home / ".ssh").mkdir(parents=True, mode=0o700)
        self.client_tmp.mkdir()
        for key in (self.sshd_dir / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "distill-sweeps-test", "-f", str(key)],
                           check=True, capture_output=True)
        auth = self.home / ".ssh" / "authorized_keys"
        shutil.copy(f"{self.key}.pub", auth)
        auth.chmod(0o600)
        os.chown(auth, self.uid, self.uid)

    def start_sshd(self) -> None:
        cfg = self.sshd_dir / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.ssh_port}", "ListenAddress 127.0.0.1", f"HostKey {self.sshd_dir / 'host_ed25519'}",
            f"PidFile {self.sshd_dir / 'sshd.pid'}", f"AllowUsers {self.user}", "PermitRootLogin no",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes yes", "AllowTcpForwarding yes", "X11Forwarding no", "PrintMotd no",
            "PrintLastLog no", "MaxSessions 32", "MaxStartups 64", "LogLevel VERBOSE", ""]))
        script = ["set -e"]
        view = self.python_view()
        if view is not None:
            hidden, child = view
            shown = self.base / "view"
            (shown / child.name).mkdir(parents=True)
            shown.chmod(0o755)
            script += [f"mount --bind {shlex.quote(str(child))} {shlex.quote(str(shown / child.name))}",
                       f"mount -o remount,bind,ro {shlex.quote(str(shown / child.name))}",
                       f"mount --rbind {shlex.quote(str(shown))} {shlex.quote(str(hidden))}"]
        if not Path("/run/sshd").is_dir():
            script += ["mount -t tmpfs -o mode=755 tmpfs /run", "mkdir -m 755 /run/sshd", "ln -s /dev/shm /run/shm"]
        script.append(f"exec {SSHD} -D -e -f {shlex.quote(str(cfg))}")
        cmd = ["sh", "-c", "\n".join(script)]
        if len(script) > 2:
            if not shutil.which("unshare"):
                pytest.skip("sshd needs a mount namespace here (/run/sshd, the Python's home) and unshare is missing")
            cmd = ["unshare", "--mount", "--propagation", "private", *cmd]
        self.sshd_log = open(self.logs / "sshd.log", "w")
        self.sshd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.sshd_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not _listening(self.ssh_port):
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                log = (self.logs / "sshd.log").read_text()
                if "unshare" in cmd[0] and ("Operation not permitted" in log or "permission denied" in log.lower()):
                    pytest.skip(f"no mount namespace for sshd here: {log.strip().splitlines()[-1]}")
                raise AssertionError(f"sshd did not start on 127.0.0.1:{self.ssh_port}:\n{log}")
            time.sleep(0.2)

    def write_config(self, **overrides) -> Path:
        """The shipped on-prem config with only the IPs, port, user, key (and Ray's ports) changed."""
        variant = bool(overrides)
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
        cfg["min_workers"] = cfg["max_workers"] = 0
        cfg["auth"] = {"ssh_user": self.user, "ssh_private_key": str(self.key),
                       "ssh_proxy_command": f"nc %h {overrides.pop('ssh_port', self.ssh_port)}"}
        p = self.ports
        head_ports = (f"--port={p['gcs']} --dashboard-port={p['dashboard']} --dashboard-agent-listen-port={p['agent']} "
                      f"--ray-client-server-port={p['client']}")
        cfg["head_start_ray_commands"] = [re.sub(r"--port=6379\b", head_ports, c) for c in cfg["head_start_ray_commands"]]
        cfg["worker_start_ray_commands"] = [c.replace(":6379", f":{p['gcs']}") for c in cfg["worker_start_ray_commands"]]
        cfg.update(overrides)
        path = self.base / f"config-{len(list(self.base.glob('config-*')))}.yaml" if variant else self.config
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_sentinel(self) -> None:
        """A root process named like Ray's raylet: the account's `ray stop` must not be able to stop it."""
        (self.base / "sentinel").mkdir()
        fake = self.base / "sentinel" / "raylet"
        shutil.copy("/bin/sleep", fake)
        self.sentinel = subprocess.Popen([str(fake), "3600"], stdin=subprocess.DEVNULL)

    def note_control_dirs(self) -> None:
        """ray's ssh ControlPath directory (/tmp/ray_ssh_*), to remove after if this test made it."""
        import hashlib
        import getpass

        h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:10]  # noqa: E731 (HASH_MAX_LENGTH)
        top = Path(f"/tmp/ray_ssh_{h(getpass.getuser())}")
        sub = top / h(yaml.safe_load(CONFIG.read_text())["cluster_name"])
        self.control_dirs = [d for d in (sub, top) if not d.exists()]

    def ray_processes(self) -> list[str]:
        """The account's processes that are Ray's (or the sweep's), as 'pid cmdline'."""
        if self.uid is None:
            return []
        return [f"{pid} {_cmdline(pid)}" for pid in _pids_of_uid(self.uid)
                if any(w in _cmdline(pid) for w in RAY_PROCESS_WORDS) and _alive(pid)]

    # --- tear down ---
    def close(self) -> list[str]:
        t0 = time.monotonic()
        problems = []
        if self.forwarder is not None:
            _kill_tree(self.forwarder.pid)
            self.forwarder.wait()
        if self.cluster_up:
            try:
                self.ray_cmd("down", "-y", str(self.config), timeout=180)
            except AssertionError as exc:
                problems.append(str(exc))
        if self.sshd is not None:
            _kill_tree(self.sshd.pid)  # sshd and the session processes it forked
            self.sshd.wait()
            self.sshd_log.close()
        if self.uid is not None:
            for _ in range(50):  # whatever the account still runs: the test's own, by PID
                pids = [p for p in _pids_of_uid(self.uid) if _alive(p)]
                if not pids:
                    break
                _kill(pids)
                time.sleep(0.1)
            subprocess.run(["userdel", self.user], capture_output=True)
        if self.sentinel is not None:
            self.sentinel.kill()
            self.sentinel.wait()
        for d in self.control_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for p, before in self.etc_before.items():
            if Path(p).read_bytes() != before:
                problems.append(f"{p} differs from before the test")
        if self._user_state() != self.user_state_before:
            problems.append("~/.ssh or ~/.ray of the user running the test changed")
        if not os.environ.get("DISTILL_TEST_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)
        print(f"[{time.monotonic() - t0:6.1f} s] teardown", flush=True)
        return problems


@pytest.fixture(scope="module")
def onprem():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux (a throwaway unix account and sshd on 127.0.0.1)")
    if sys.prefix != sys.base_prefix:
        pytest.skip("run from a Python that is not a virtualenv: the node's virtualenv sees only the base Python's packages")
    lab = OnPrem()
    try:
        reason = lab.ensure_tools()
        if reason:
            pytest.skip(reason)
        lab.note_control_dirs()
        lab.add_user()
        lab.make_keys()
        lab.start_sshd()
        lab.make_client()
        rc, out = lab.ray_cmd("get-auth-token", "--generate", timeout=60)
        assert rc == 0 and (lab.client_home / ".ray" / "auth_token").is_file(), out
        lab.write_config()
        lab.start_sentinel()
        yield lab
    finally:
        problems = lab.close()
        assert not problems, problems


def _check(lab: OnPrem, config: Path, env: dict | None = None) -> tuple[int, list[str]]:
    rc, out = lab.run([sys.executable, "cluster/check.py", str(config)], timeout=120, env=env)
    return rc, [ln for ln in out.splitlines() if ln.strip()]


def test_config_copy_changes_only_hosts_port_user_key(onprem):
    shipped, copy = yaml.safe_load(CONFIG.read_text()), yaml.safe_load(onprem.config.read_text())
    changed = {"provider", "auth", "min_workers", "max_workers", "head_start_ray_commands", "worker_start_ray_commands"}
    assert {k: v for k, v in copy.items() if k not in changed} == {k: v for k, v in shipped.items() if k not in changed}
    assert copy["setup_commands"] == shipped["setup_commands"] == ["bash ~/distill-sweeps/cluster/setup_node.sh"]
    assert [re.sub(r"--port=\d+( --[a-z-]+-port=\d+)*", "--port=6379", c) for c in copy["head_start_ray_commands"]] \
        == shipped["head_start_ray_commands"]


def test_check_passes_and_reports_an_unreachable_head_in_one_line(onprem):
    rc, lines = _check(onprem, onprem.config)
    assert rc == 0 and lines == [f"ok: {onprem.config}: local files present, 1 host(s) answer over SSH"], lines
    closed = _free_port()
    rc, lines = _check(onprem, onprem.write_config(ssh_port=closed))
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"head 127.0.0.1: cannot log in over SSH as {onprem.user} with {onprem.key}: "), lines


def test_check_reports_a_missing_token_in_one_line(onprem):
    env = dict(onprem.env, HOME=str(onprem.base / "no-token-home"))
    rc, lines = _check(onprem, onprem.config, env=env)
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("no Ray auth token at ~/.ray/auth_token") and "ray get-auth-token --generate" in lines[0]


def test_a_failing_setup_command_stops_ray_up_with_one_line(onprem):
    config = onprem.write_config(setup_commands=["DISTILL_PYTHON=python3.0 bash ~/distill-sweeps/cluster/setup_node.sh"])
    rc, out = onprem.ray_cmd("up", "-y", str(config), timeout=600)
    assert rc != 0, out
    line = _one_line(out.splitlines(), "setup_node: ")
    assert "no 'python3.0' on the PATH" in line and "install Python >= 3.10 or set DISTILL_PYTHON" in line, line
    assert not onprem.ray_processes(), "Ray started although the setup command failed"
    assert not _listening(onprem.ports["gcs"])


def test_ray_up_submit_rsync_down_ray_down(onprem):
    lab, config = onprem, str(onprem.config)
    t0 = time.monotonic()
    rc, out = lab.ray_cmd("up", "-y", config, timeout=1200)
    lab.cluster_up = True
    assert rc == 0, out[-6000:]
    assert "setup_node: distill-sweeps installed in" in out, out[-6000:]
    assert lab.sentinel.poll() is None, "ray up's `ray stop` stopped a Ray-named process of another user"
    assert (lab.home / "distill-sweeps" / "sweeps" / "run.py").is_file() and (lab.home / ".ray" / "auth_token").is_file()

    rc, out = lab.ray_cmd("exec", config, "ray status", timeout=180)
    assert rc == 0 and re.search(r"^ 1 local\.cluster\.node$", out, re.M) and re.search(r"/\d+(\.\d+)? CPU", out), \
        out[-3000:]

    lab.forwarder = subprocess.Popen([lab.ray, "dashboard", config, "--port", str(lab.local_dashboard),
                                      "--remote-port", str(lab.ports["dashboard"])], cwd=REPO, env=lab.env,
                                     stdin=subprocess.DEVNULL, stdout=open(lab.logs / "dashboard.log", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{lab.local_dashboard}"
    deadline = time.monotonic() + 60
    while True:
        try:  # any HTTP answer (401 without the token) means the forward reaches the dashboard
            urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert time.monotonic() < deadline and lab.forwarder.poll() is None, \
                (lab.logs / "dashboard.log").read_text()
            time.sleep(1)

    # without the token: refused, in one line
    rc, out = lab.ray_cmd("job", "list", "--address", address, timeout=120)
    assert rc != 0, out
    line = _one_line(out.splitlines(), "Authentication required")
    assert "Missing authentication token" in line, line

    token = dict(lab.env, RAY_AUTH_MODE="token")
    out_dir = f"{lab.home}/distill-runs/d_coef-smoke"
    sid = f"distill-onprem-{secrets.token_hex(3)}"
    rc, submitted = lab.ray_cmd("job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
                                "--", "python", "sweeps/run.py", "--grid", "d_coef", "--preset", "smoke",
                                "--address", "auto", "--out", out_dir, timeout=JOB_TIMEOUT_S, env=token)
    assert rc == 0, submitted[-6000:]
    rc, status = lab.ray_cmd("job", "status", "--address", address, sid, timeout=120, env=token)
    assert rc == 0 and f"Job '{sid}' succeeded" in status, status
    rc, logs = lab.ray_cmd("job", "logs", "--address", address, sid, timeout=120, env=token)
    assert rc == 0
    assert f"results: {out_dir}/results.jsonl" in logs and f"report:  {out_dir}/report/report.md" in logs, logs[-3000:]

    local = lab.base / "results"
    rc, out = lab.ray_cmd("rsync-down", config, f"{out_dir}/", f"{local}/", timeout=300)
    assert rc == 0, out[-3000:]
    rows = [json.loads(ln) for ln in (local / "results.jsonl").read_text().splitlines() if ln.strip()]
    assert rows and all(not r.get("error") for r in rows), rows[:3]
    assert (local / "report" / "report.md").is_file() and (local / "sweep.json").is_file()
    assert sorted(str(p.relative_to(local)) for p in (local / "students").rglob("*.pt")) == sorted(
        f"students/{r['trial_id']}/seed-{r['config']['seed']}/{r['quant']}.pt" for r in rows if r["phase"] == "final")

    lab.forwarder.send_signal(signal.SIGTERM)
    _kill_tree(lab.forwarder.pid)
    lab.forwarder.wait()
    lab.forwarder = None
    rc, out = lab.ray_cmd("down", "-y", config, timeout=300)
    lab.cluster_up = rc != 0
    assert rc == 0, out[-3000:]
    deadline = time.monotonic() + 30
    while lab.ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not lab.ray_processes(), lab.ray_processes()
    assert not _listening(lab.ports["gcs"]) and not _listening(lab.ports["dashboard"])
    assert lab.sentinel.poll() is None, "ray down's `ray stop` stopped a Ray-named process of another user"
    print(f"on-prem up -> job -> down: {time.monotonic() - t0:.0f} s")
