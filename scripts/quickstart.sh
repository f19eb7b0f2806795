#!/usr/bin/env bash
# One command on a fresh machine: install, then run the main job (the d_coef sweep on MT-mini,
# embedded local Ray, no data, checkpoints or GPU needed). Extra arguments go to sweeps/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL=${MUJOCO_GL:-disable}
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q -e . --no-deps
exec python3 sweeps/run.py --grid d_coef "$@"
