#!/usr/bin/env bash
# One command on a fresh machine: install, then run the main job (the d_coef sweep on MT-mini,
# embedded local Ray, no data, checkpoints or GPU needed). Extra arguments go to sweeps/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL=${MUJOCO_GL:-disable}
started=$SECONDS
# --no-compile: pip would byte-compile every installed file (torch and ray: ~45 s on 2 cores);
# Python compiles the modules a sweep imports on first use instead.
python3 -m pip install -q --no-compile torch==2.13.0
python3 -m pip install -q --no-compile -r requirements.txt
python3 -m pip install -q --no-compile -e . --no-deps
echo "quickstart: installed in $((SECONDS - started)) s; running python3 sweeps/run.py --grid d_coef $*"
exec python3 sweeps/run.py --grid d_coef "$@"
