"""Shared test helpers: where the reference fixtures live, and a skip when they are absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")

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
