#!/usr/bin/env bash
# Installs distill-sweeps on one Ray node: the setup command of every cluster config (AWS, GCP,
# on-prem), run by `ray up` on the head and by the autoscaler on each worker, from the repository
# copy that the config's file_mounts put at ~/distill-sweeps:
#
#   bash ~/distill-sweeps/cluster/setup_node.sh
#
# 1. A virtualenv, ~/distill-venv ($DISTILL_VENV), made with the node's python3 ($DISTILL_PYTHON)
#    and seeing its site-packages, so what the image or the lab server already has (CUDA torch,
#    Ray) is used as it is and a Debian/Ubuntu system Python ("externally managed") is left alone.
# 2. requirements.txt, this repository in editable mode and ray[default] (the dashboard and its job
#    server, which `ray job submit` talks to), into that virtualenv.
# 3. A marked block at the end of ~/.bashrc that activates it and sets RAY_AUTH_MODE=token: Ray's
#    cluster launcher runs every command (ray start, ray stop on `ray down`, ray status) in an
#    interactive bash, and a job's `python` is the one Ray was started with.
# 4. A check that the Ray auth token the config copies to ~/.ray/auth_token is there.
# Run again, it only installs what changed. Any failure ends with one line "setup_node: ..." and
# exit status 1, which makes `ray up` stop there.
set -uo pipefail

fail() { echo "setup_node: $* (on $(hostname))" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${DISTILL_PYTHON:-python3}
venv=${DISTILL_VENV:-$HOME/distill-venv}

[ -s "$HOME/.ray/auth_token" ] || fail "no Ray auth token at ~/.ray/auth_token: run 'ray get-auth-token --generate' \
once on the machine you run 'ray up' from; the config copies ~/.ray/auth_token to every node"
command -v "$python" >/dev/null 2>&1 || fail "no '$python' on the PATH of $(id -un): install Python >= 3.10 or set DISTILL_PYTHON"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || fail "$python is $("$python" -V 2>&1); distill-sweeps needs Python >= 3.10"

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
        # Debian/Ubuntu without python3-venv have no ensurepip: a venv without pip of its own
        # still runs the system's pip (it sees the system site-packages) and installs into itself.
        rm -rf "$venv"
        "$python" -m venv --without-pip --system-site-packages "$venv" \
            || fail "cannot create a virtualenv at $venv with $python (apt-get install python3-venv)"
    fi
fi
vpy=$venv/bin/python
"$vpy" -m pip --version >/dev/null 2>&1 || fail "no pip for $python (apt-get install python3-pip)"
"$vpy" -m pip install -q --disable-pip-version-check -r "$repo/requirements.txt" \
    || fail "pip install -r requirements.txt into $venv failed (pip's message is above)"
"$vpy" -m pip install -q --disable-pip-version-check --no-deps -e "$repo" \
    || fail "pip install -e $repo into $venv failed (pip's message is above)"
# A cluster also needs Ray's dashboard, whose HTTP server takes `ray job submit`: ray[default], for
# the Ray version installed (requirements.txt asks only for ray[tune], enough on one machine).
ray_version=$("$vpy" -c 'import ray; print(ray.__version__)' 2>/dev/null) || fail "$vpy cannot import ray after the install"
"$vpy" -m pip install -q --disable-pip-version-check "ray[default]==$ray_version" \
    || fail "pip install ray[default]==$ray_version (the job server of ray job submit) into $venv failed (pip's message is above)"
# Ray came from the system site-packages: its `ray` script runs the system python, which would not
# see this virtualenv. This one runs the same CLI with the virtualenv's python.
if [ ! -e "$venv/bin/ray" ]; then
    printf '#!/bin/sh\nexec "%s" -m ray.scripts.scripts "$@"\n' "$vpy" >"$venv/bin/ray" && chmod +x "$venv/bin/ray"
fi
"$vpy" -c 'import ray, torch, aiohttp, agent, sweeps' 2>/dev/null \
    || fail "$vpy cannot import ray[default], torch and distill-sweeps after the install"

begin="# >>> distill-sweeps (cluster/setup_node.sh) >>>"
if ! grep -qxF "$begin" "$HOME/.bashrc" 2>/dev/null; then
    printf '\n%s\nsource %q/bin/activate\nexport RAY_AUTH_MODE=token\n%s\n' \
        "$begin" "$venv" "# <<< distill-sweeps <<<" >>"$HOME/.bashrc"
fi
echo "setup_node: distill-sweeps installed in $venv ($("$vpy" -c 'import ray, torch; print("ray", ray.__version__, "torch", torch.__version__)'))"
