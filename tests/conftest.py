"""Shared test helpers: where the reference fixtures live, and a skip when they are absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")
# One intra-op thread: on a 2-core machine that is busy with anything else, two OpenMP threads
# spin-wait for each other and small ops slow down by 10-100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

_REPO = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    """`$DISTILL_FIXTURES` if set, else `../shared/fixtures` beside the checkout."""
    env = os.environ.get("DISTILL_FIXTURES")
    return Path(env) if env else _REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = fixtures_path()
    if not (path / "fixtures.json").is_file():
        pytest.skip(f"reference fixtures not found at {path} (set $DISTILL_FIXTURES or place shared/ beside the repo)")
    return path
