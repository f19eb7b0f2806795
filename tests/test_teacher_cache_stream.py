"""The teacher cache's streaming builder: blocks read ahead and written behind on background threads
give the same cache bytes as one block after another; errors in any stage surface and stop the
threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.data import TeacherCache
from agent.data.teacher_cache import DEFAULT_BATCH_ROWS, pipelined
from tests.test_data import _random_world_model, make_store


def _stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("teacher-cache-")]


def test_prefetched_build_writes_the_same_bytes(tmp_path):
    model, teacher = _random_world_model(tmp_path)
    store = make_store(tmp_path / "store", n=10, length=41)
    caches = {}
    for prefetch in (0, 2):
        # 40 rows per episode, 2 episodes per block: 5 blocks through the pipeline
        caches[prefetch] = TeacherCache.get_or_build(store, teacher, pca_dim=4, batch_rows=80, prefetch=prefetch,
                                                     cache_root=tmp_path / f"cache-{prefetch}")
    assert not _stream_threads()
    for part in ("reward/teacher_reward.npy", "pca4/latent.npy", "pca4/mean.npy", "pca4/components.npy"):
        a, b = (caches[p].directory / part for p in (0, 2))
        assert a.read_bytes() == b.read_bytes(), part
    assert np.isfinite(caches[2].teacher_reward[:, 1:]).all() and np.isnan(caches[2].teacher_reward[:, 0]).all()
    assert caches[2].teacher_reward[:, 1:].std() > 1e-3


def test_default_batch_rows_follow_the_device(tmp_path):
    model, teacher = _random_world_model(tmp_path)
    store = make_store(tmp_path / "store", n=4, length=21)
    cache = TeacherCache.get_or_build(store, teacher, cache_root=tmp_path / "cache")
    import json

    meta = json.loads((cache.directory / "reward" / "meta.json").read_text())
    assert meta["batch_rows"] == DEFAULT_BATCH_ROWS["cpu"] and DEFAULT_BATCH_ROWS["cuda"] >= 16 * DEFAULT_BATCH_ROWS["cpu"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_pipeline_keeps_order_and_overlaps(depth):
    blocks = list(range(20))
    written = []
    pipelined(blocks, lambda b: b * 10, lambda b, x: (b, x + 1), lambda b, r: written.append((b, r)), depth)
    assert written == [(b, (b, b * 10 + 1)) for b in blocks]
    assert not _stream_threads()


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_pipeline_errors_surface_and_stop_the_threads(stage):
    def fail_at(name):
        def fn(b, *rest):
            if name == stage and b == 5:
                raise OSError(f"{name} failed at block 5")
            return b
        return fn

    written = []
    with pytest.raises(OSError, match=f"{stage} failed at block 5"):
        pipelined(list(range(50)), fail_at("read"), fail_at("compute"),
                  lambda b, r: (fail_at("write")(b), written.append(b)), depth=2)
    assert not _stream_threads()
    assert written == list(range(len(written))) and len(written) <= 5
