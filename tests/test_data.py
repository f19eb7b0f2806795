"""Offline data: episode store, sampler, TD-MPC2 chunk import, crash safety, teacher cache, collector."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from agent.data import (
    EpisodeStore, EpisodeStoreWriter, StoreError, TeacherCache, UntrustedPickleError, import_tdmpc2, write_store,
)
from agent.data.__main__ import main as cli_main
from agent.tasksets import MT30

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_FP16 = "published/mt30_1M_steps_045dist_fp16.pt"


# tiny models: one intra-op thread avoids thread spin-waits on a busy 2-core machine
_CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=_CHILD_ENV)


def spawn_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=_CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def coded_episodes(n: int, length: int, first_episode: int = 0):
    """Episodes whose values encode (episode, step): obs[n, t] = (n, t, ...), action[n, t] = (n, t, ...),
    reward[n, t] = 1000 n + t; action/reward NaN at t = 0 (official alignment)."""
    ep = np.arange(first_episode, first_episode + n, dtype=np.float32)[:, None]
    step = np.arange(length, dtype=np.float32)[None, :]
    obs = np.zeros((n, length, 24), np.float32)
    obs[..., 0], obs[..., 1] = ep, step
    obs[..., 2:] = np.random.default_rng(first_episode).standard_normal((n, length, 22))
    action = np.zeros((n, length, 6), np.float32)
    action[..., 0], action[..., 1] = ep, step
    action[..., 2:] = np.random.default_rng(first_episode + 1).uniform(-1, 1, (n, length, 4))
    reward = (1000 * ep + step).astype(np.float32)
    action[:, 0], reward[:, 0] = np.nan, np.nan
    task = np.arange(first_episode, first_episode + n) % len(MT30)
    return obs, action, reward, task


def make_store(path: Path, n: int = 12, length: int = 21) -> EpisodeStore:
    return write_store(path, *coded_episodes(n, length), tasks=MT30, task_set="mt30")


def save_chunk(path: Path, episodes: int, length: int, seed: int, reward_shape: str, terminated: bool) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, 30, (episodes, 1), generator=g).expand(episodes, length).clone()
    fields = {
        "obs": torch.randn(episodes, length, 24, generator=g),
        "action": torch.rand(episodes, length, 6, generator=g) * 2 - 1,
        "reward": torch.rand(episodes, length, *((1,) if reward_shape == "column" else ()), generator=g) * 2,
        "task": task,
        "episode": torch.arange(episodes)[:, None].expand(episodes, length).clone(),  # extra key: ignored
    }
    fields["action"][:, 0] = float("nan")
    fields["reward"][:, 0] = float("nan")
    if terminated:
        fields["terminated"] = torch.zeros(episodes, length)
        fields["terminated"][:, 0] = float("nan")
    td = TensorDict(fields, batch_size=(episodes, length))
    torch.save(td, path)
    return td


# ---------------------------------------------------------------------------------------------
# import


def test_import_round_trip(tmp_path):
    chunks = [
        save_chunk(tmp_path / "chunk_0.pt", 5, 31, seed=0, reward_shape="flat", terminated=True),
        save_chunk(tmp_path / "chunk_1.pt", 3, 31, seed=1, reward_shape="column", terminated=True),
    ]
    store = import_tdmpc2([tmp_path / "chunk_0.pt", tmp_path / "chunk_1.pt"], tmp_path / "store",
                          trust_pickle=True, progress=False)
    assert store.num_episodes == 8 and store.episode_length == 31
    assert store.manifest.entries == 8 * 31 and store.manifest.transitions == 8 * 30
    assert (store.obs_dim, store.action_dim, store.tasks) == (24, 6, MT30)
    want = {k: torch.cat([c[k] for c in chunks]).numpy() for k in ("obs", "action", "terminated")}
    want["reward"] = torch.cat([c["reward"].reshape(c.batch_size) for c in chunks]).numpy()
    for key, value in want.items():
        np.testing.assert_array_equal(getattr(store, key), value)  # NaN entries compare equal
    np.testing.assert_array_equal(store.task, torch.cat([c["task"][:, 0] for c in chunks]).numpy())
    assert store.task.dtype == np.int64 and np.isnan(store.reward[:, 0]).all()
    store.verify()

    # a directory argument imports its sorted *.pt files; appending doubles the episodes
    store2 = import_tdmpc2([tmp_path], tmp_path / "store", trust_pickle=True, mode="append", progress=False)
    assert store2.num_episodes == 16 and store2.uid != store.uid
    np.testing.assert_array_equal(store2.obs[8:], want["obs"])
    np.testing.assert_array_equal(store.obs, want["obs"])  # maps of the replaced version stay valid


def test_import_refuses_without_trust_pickle(tmp_path):
    save_chunk(tmp_path / "chunk_0.pt", 2, 11, seed=0, reward_shape="flat", terminated=False)
    with pytest.raises(UntrustedPickleError, match="arbitrary code"):
        import_tdmpc2([tmp_path / "chunk_0.pt"], tmp_path / "store", trust_pickle=False)
    cli = run_python(["-m", "agent.data", "import-tdmpc2", str(tmp_path / "chunk_0.pt"), "--out", str(tmp_path / "store")])
    assert cli.returncode == 2
    assert cli.stderr.count("\n") == 1 and "--trust-pickle" in cli.stderr and "arbitrary code" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert not (tmp_path / "store").exists()


def test_import_rejects_malformed_chunk(tmp_path):
    torch.save({"obs": torch.zeros(2, 5, 24)}, tmp_path / "chunk_0.pt")
    with pytest.raises(ValueError, match="missing key"):
        import_tdmpc2([tmp_path / "chunk_0.pt"], tmp_path / "store", trust_pickle=True, progress=False)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------
# sampler


def test_sampler_shapes_bounds_and_alignment(tmp_path):
    n, length, horizon, batch = 12, 21, 5, 4096
    store = make_store(tmp_path / "store", n, length)
    obs, action, reward, task, index = store.sample(batch, horizon, seed=0, return_index=True)
    assert obs.shape == (horizon + 1, batch, 24) and obs.dtype == torch.float32
    assert action.shape == (horizon, batch, 6) and reward.shape == (horizon, batch, 1)
    assert task.shape == (batch,) and task.dtype == torch.int64
    ep, start = torch.from_numpy(index.episode), torch.from_numpy(index.start)
    assert start.min() == 0 and start.max() == length - 1 - horizon  # every valid start, none past the end
    assert ep.min() == 0 and ep.max() == n - 1
    h = torch.arange(horizon + 1)[:, None]
    # obs[h] is entry start+h of the sampled episode: never crosses an episode boundary
    assert torch.equal(obs[..., 0], ep.float().expand(horizon + 1, batch))
    assert torch.equal(obs[..., 1], (start + h).float())
    # action[h] / reward[h] are those of entry start+h+1 (the move obs[h] -> obs[h+1])
    assert torch.equal(action[..., 0], ep.float().expand(horizon, batch))
    assert torch.equal(action[..., 1], (start + h[1:]).float())
    assert torch.equal(reward[..., 0], (1000 * ep + start + h[1:]).float())
    assert not torch.isnan(action).any() and not torch.isnan(reward).any()
    assert torch.equal(task, torch.from_numpy(store.task[index.episode]))
    # roughly uniform over episodes and starts
    assert np.bincount(index.episode, minlength=n).min() > 0.7 * batch / n
    assert np.bincount(index.start).min() > 0.7 * batch / (length - horizon)


def test_sampler_streams_are_reproducible(tmp_path):
    store = make_store(tmp_path / "store")
    a, b = store.sampler(32, 3, seed=7), store.sampler(32, 3, seed=7)
    for _ in range(3):
        for x, y in zip(a.next(), b.next()):
            assert torch.equal(x, y)
    first, second = store.sampler(32, 3, seed=1).next(), store.sampler(32, 3, seed=2).next()
    assert not torch.equal(first[0], second[0])
    only = store.sampler(256, 3, seed=0, task_ids=[2, 5])
    assert set(only.next()[3].tolist()) == {2, 5}
    with pytest.raises(ValueError, match="horizon"):
        store.sampler(8, 21)


# ---------------------------------------------------------------------------------------------
# crash safety

_KILLED_WRITER = """
    import sys, time
    import numpy as np
    from agent.data import EpisodeStoreWriter
    from agent.tasksets import MT30
    path, ready = sys.argv[1], sys.argv[2]
    writer = EpisodeStoreWriter(path, tasks=MT30, task_set="mt30", obs_dim=24, action_dim=6,
                                episode_length=21, mode=sys.argv[3])
    block = np.ones((50, 21, 24), np.float32)
    writer.append(block, np.ones((50, 21, 6), np.float32), np.ones((50, 21), np.float32), np.zeros(50, np.int64))
    open(ready, "w").close()
    time.sleep(60)
"""


def _kill_mid_write(path: Path, ready: Path, mode: str) -> None:
    proc = spawn_python(_KILLED_WRITER, str(path), str(ready), mode)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_writer_killed_mid_write_leaves_previous_store_intact(tmp_path):
    path = tmp_path / "store"
    before = make_store(path)
    manifest_text = (path / "manifest.json").read_text()
    _kill_mid_write(path, tmp_path / "ready", mode="append")
    after = EpisodeStore(path)
    assert (path / "manifest.json").read_text() == manifest_text
    assert after.num_episodes == before.num_episodes == 12
    np.testing.assert_array_equal(after.obs, coded_episodes(12, 21)[0])
    after.verify()
    leftovers = list(tmp_path.glob(".store.tmp-*"))
    assert len(leftovers) == 1  # the dead writer's private temp dir, never visible as the store
    # the next writer removes it and appends normally
    grown = write_store(path, *coded_episodes(3, 21, first_episode=12), tasks=MT30, task_set="mt30", mode="append")
    assert grown.num_episodes == 15 and not list(tmp_path.glob(".store.tmp-*"))
    np.testing.assert_array_equal(grown.reward[12:, 1:], coded_episodes(3, 21, first_episode=12)[2][:, 1:])

    # a killed "create" leaves no store at all
    _kill_mid_write(tmp_path / "fresh", tmp_path / "ready2", mode="create")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(StoreError, match="does not exist"):
        EpisodeStore(tmp_path / "fresh")


def test_writer_exception_aborts_and_keeps_store(tmp_path):
    path = tmp_path / "store"
    make_store(path)
    obs, action, reward, task = coded_episodes(2, 21)
    with pytest.raises(RuntimeError, match="boom"):
        with EpisodeStoreWriter(path, tasks=MT30, task_set="mt30", obs_dim=24, action_dim=6, episode_length=21,
                                mode="overwrite") as writer:
            writer.append(obs, action, reward, task)
            raise RuntimeError("boom")
    assert EpisodeStore(path).num_episodes == 12 and not list(tmp_path.glob(".store.tmp-*"))
    with pytest.raises(StoreError, match="already exists"):
        write_store(path, obs, action, reward, task, tasks=MT30, task_set="mt30")
    with pytest.raises(StoreError, match="shape"):
        write_store(tmp_path / "other", obs, action, reward[:, :10], task, tasks=MT30, task_set="mt30")
    assert not (tmp_path / "other").exists()


def test_append_falls_back_without_atomic_exchange(tmp_path, monkeypatch):
    import agent.data.store as store_module

    monkeypatch.setattr(store_module, "_exchange_paths", lambda a, b: False)  # e.g. a non-Linux filesystem
    path = tmp_path / "store"
    make_store(path, n=4)
    grown = write_store(path, *coded_episodes(2, 21, first_episode=4), tasks=MT30, task_set="mt30", mode="append")
    assert grown.num_episodes == 6 and sorted(p.name for p in tmp_path.iterdir()) == [".store.write.lock", "store"]
    np.testing.assert_array_equal(grown.obs[:, 0, 0], np.arange(6))
    grown.verify()


# ---------------------------------------------------------------------------------------------
# bad stores


def test_bad_store_errors(tmp_path, capsys):
    def error_of(path) -> str:
        with pytest.raises(StoreError) as info:
            EpisodeStore(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        return message

    (tmp_path / "file").write_text("x")
    assert "not a directory" in error_of(tmp_path / "file")
    assert "does not exist" in error_of(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    assert "no manifest.json" in error_of(tmp_path / "empty_dir")

    def fresh(name: str) -> Path:
        make_store(tmp_path / name)
        return tmp_path / name

    corrupt = fresh("corrupt")
    (corrupt / "manifest.json").write_text('{"format": "distill-sweeps/episode-store", "format_ver')
    assert "corrupt manifest.json" in error_of(corrupt)
    missing = fresh("missing_array")
    (missing / "action.npy").unlink()
    assert "action.npy is missing" in error_of(missing)
    truncated = fresh("truncated")
    with open(truncated / "obs.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    assert "bytes, expected" in error_of(truncated)
    empty = fresh("empty")
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "episodes": 0}))
    assert "empty" in error_of(empty)
    tampered = fresh("tampered")
    with open(tampered / "reward.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(np.float32(123.0).tobytes())
    EpisodeStore(tampered)  # sizes still match; only a full verify sees the change
    with pytest.raises(StoreError, match="sha256"):
        EpisodeStore(tampered).verify()

    assert cli_main(["info", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "corrupt manifest.json" in err
    assert cli_main(["info", str(fresh("good")), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "12 x 21 entries" in out and "match their sha256" in out


# ---------------------------------------------------------------------------------------------
# teacher cache

_CACHE_REQUESTER = """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from agent.data import TeacherCache, TeacherFunctions
    store, teacher, marker, barrier, peers = sys.argv[1:6]

    def stand_in_factory(path, device):
        with open(marker, "a") as f:
            f.write(f"build {os.getpid()}\\n")
        def reward(obs, action, task):
            time.sleep(0.3)  # slow enough that the other requester arrives mid-build
            return obs[:, :1] * 2 + action[:, 1:2] + task[:, None].float()
        return TeacherFunctions(reward=reward)

    Path(barrier, str(os.getpid())).touch()
    while len(os.listdir(barrier)) < int(peers):  # start both requests together
        time.sleep(0.01)
    cache = TeacherCache.get_or_build(store, teacher, teacher_factory=stand_in_factory, batch_rows=64)
    print(float(np.nansum(cache.teacher_reward)))
"""


def test_concurrent_cache_requests_build_once(tmp_path):
    store = make_store(tmp_path / "store", n=12, length=21)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"a stand-in teacher file; only its hash matters")
    marker, barrier = tmp_path / "builds.log", tmp_path / "barrier"
    barrier.mkdir()
    procs = [spawn_python(_CACHE_REQUESTER, str(store.path), str(teacher), str(marker), str(barrier), "2")
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert len(marker.read_text().splitlines()) == 1  # one build, the other process waited and mapped it
    assert outputs[0][0] == outputs[1][0]

    def no_build(path, device):
        raise AssertionError("cache should already exist")

    cache = TeacherCache.get_or_build(store, teacher, teacher_factory=no_build)
    obs, action, reward, task = (np.asarray(x) for x in coded_episodes(12, 21))
    want = obs[:, :-1, 0] * 2 + action[:, 1:, 1] + task[:, None]  # stand-in on (obs_{t-1}, action_t)
    np.testing.assert_allclose(cache.teacher_reward[:, 1:], want, rtol=1e-6)
    assert np.isnan(cache.teacher_reward[:, 0]).all()
    assert cache.directory.parent == store.path / "teacher_cache" and len(cache.directory.name) == 16


def _live_teacher_rewards(model, obs, action, task) -> torch.Tensor:
    """(H, B, 1) teacher rewards computed directly from a sampled batch (the distillation target)."""
    from agent.math import two_hot_inv

    with torch.no_grad():
        return torch.stack([
            two_hot_inv(model.reward(model.encode(obs[h], task), action[h], task), model.cfg.vmin, model.cfg.vmax)
            for h in range(action.shape[0])
        ])


def _random_world_model(tmp_path: Path):
    from agent.checkpoint import save_world_model
    from agent.config import ModelConfig
    from agent.world_model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(ModelConfig(enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the init zeroes the reward head; make predictions vary
    path = save_world_model(model, tmp_path / "teacher.pt")
    return model.eval(), path


def _check_cache_against_live(store: EpisodeStore, cache: TeacherCache, model) -> None:
    obs, action, reward, task, index = store.sample(128, 3, seed=3, return_index=True)
    cached = cache.gather(index.episode, index.start, 3)
    live = _live_teacher_rewards(model, obs, action, task)
    assert cached.shape == live.shape == (3, 128, 1)
    assert live.std() > 1e-3  # a meaningful comparison, not constant predictions
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)


def test_cache_matches_live_teacher_small_model(tmp_path):
    model, path = _random_world_model(tmp_path)
    store = make_store(tmp_path / "store", n=10, length=41)
    cache = TeacherCache.get_or_build(store, path, pca_dim=4, batch_rows=256)
    _check_cache_against_live(store, cache, model)

    pca = cache.pca
    assert pca.latent.shape == (10, 41, 4) and pca.components.shape == (4, 16)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-5)
    assert np.all(np.diff(pca.explained_variance_ratio) <= 1e-7)
    obs, _, _, task, index = store.sample(64, 3, seed=4, return_index=True)
    with torch.no_grad():
        z = model.encode(obs, task.expand(4, -1))
    want = (z - torch.from_numpy(pca.mean)) @ torch.from_numpy(pca.components).T
    torch.testing.assert_close(cache.gather_latent(index.episode, index.start, 3), want, rtol=1e-4, atol=1e-5)


def test_cache_matches_live_teacher_published_model(tmp_path, fixtures_dir):
    from agent.checkpoint import load_world_model

    teacher = fixtures_dir / PUBLISHED_FP16
    store = make_store(tmp_path / "store", n=8, length=101)
    cache = TeacherCache.get_or_build(store, teacher)
    _check_cache_against_live(store, cache, load_world_model(teacher))


# ---------------------------------------------------------------------------------------------
# collector


def test_collect_records_official_alignment(tmp_path, capsys):
    from agent.data.collect import collect_episodes
    from agent.envs import make_env

    model, path = _random_world_model(tmp_path)
    full = collect_episodes(model, ["pendulum-swingup"], episodes=1, seed=5, plan=False)
    assert full.obs.shape == (1, 501, 24) and full.action.shape == (1, 501, 6) and full.reward.shape == (1, 501)

    tasks, steps = ["pendulum-swingup", "cartpole-balance"], 60  # short episodes keep the test fast
    got = collect_episodes(model, tasks, episodes=2, seed=5, plan=False, noise_std=0.3, num_envs=3,
                           episode_steps=steps)
    assert got.obs.shape == (4, steps + 1, 24)
    np.testing.assert_array_equal(got.task, [MT30.index(t) for t in tasks for _ in range(2)])
    for ep in (full, got):
        assert np.isnan(ep.action[:, 0]).all() and np.isnan(ep.reward[:, 0]).all()
        assert not np.isnan(ep.action[:, 1:]).any() and not np.isnan(ep.reward[:, 1:]).any()
        assert ((ep.reward[:, 1:] >= 0) & (ep.reward[:, 1:] <= 2)).all()
    assert (got.action[:, 1:, 1:] == 0).all() and (np.abs(got.action[:, 1:, 0]) <= 1).all()  # 1-d actions, padded
    assert (got.obs[:2, :, 3:] == 0).all() and (got.obs[2:, :, 5:] == 0).all()  # obs dims 3 and 5, padded
    # episode k of task T starts at make_env(T, seed + k).reset(); entry t is the env's t-th step
    env = make_env("cartpole-balance", 5 + 1)
    np.testing.assert_array_equal(got.obs[3, 0, :5], env.reset())
    for t in (1, 2):
        obs_t, r_t, *_ = env.step(got.action[3, t, :1])
        np.testing.assert_array_equal(got.obs[3, t, :5], obs_t)
        assert got.reward[3, t] == np.float32(r_t)

    # the CLI writes the same episodes into a store (reproducible across processes)
    cli = run_python(["-m", "agent.data", "collect", "--checkpoint", str(path), "--tasks", ",".join(tasks),
                      "--episodes", "2", "--out", str(tmp_path / "store"), "--seed", "5", "--no-plan",
                      "--noise", "0.3", "--num-envs", "3", "--episode-steps", str(steps), "--quiet"])
    assert cli.returncode == 0, cli.stderr
    store = EpisodeStore(tmp_path / "store")
    assert store.num_episodes == 4 and store.episode_length == steps + 1 and store.manifest.task_set == "mt30"
    for key in ("obs", "action", "reward", "task"):
        np.testing.assert_array_equal(getattr(store, key), getattr(got, key))
    assert cli_main(["collect", "--checkpoint", str(path), "--tasks", "walker-flip", "--episodes", "1",
                     "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "walker-flip" in err and not (tmp_path / "bad").exists()
