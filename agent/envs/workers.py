"""Environments of a lockstep evaluation, stepped in-process or in worker processes.

`evaluate` plans every (task, episode) environment in one agent call per step; on a GPU the
MuJoCo steps of hundreds of environments would then serialize behind one Python thread. With
`EnvWorkers(specs, n)` the environments are split into n contiguous slices, each built and
stepped by its own process (multiprocessing "spawn": a fresh interpreter that imports only the
environments, never inherits CUDA or OpenMP state). Both groups expose the same two calls:

    group.reset() -> obs (E, obs_pad) float32
    group.step(actions (E, action_pad), running (E,) bool) -> (obs, reward (E,) float64, done (E,) bool)

and build each environment from the same (task, seed, episode) as the in-process group, so an
evaluation returns bit-identical returns with or without workers. A finished environment (running
False) is not stepped; its row keeps its last observation and reports reward 0, done True.

Workers talk over pipes (no queues, no shared semaphores) and are always joined: `close()` (also
on error, via the context manager) asks each to exit, waits, and terminates any that hang.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass
from typing import Sequence

import numpy as np

JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EnvSpec:
    """One environment of an evaluation: `task` built with `seed`, reset `episode` times before
    its own episode, episodes cut to `max_steps` agent steps (None: the task's default)."""

    task: str
    seed: int
    episode: int
    max_steps: int | None = None


def build_env(spec: EnvSpec):
    """The environment of `spec`: made with spec.seed and reset spec.episode times, so that its next
    reset is episode spec.episode of the official sequential loop."""
    from agent.envs import make_env

    env = make_env(spec.task, spec.seed)
    for _ in range(spec.episode):
        env.reset()
    if spec.max_steps is not None:
        env.max_episode_steps = spec.max_steps
    return env


class LocalEnvs:
    """Environments stepped in this process (E = len(envs))."""

    def __init__(self, envs: Sequence, obs_pad: int):
        self.envs, self.obs_pad = list(envs), obs_pad
        self.obs = np.zeros((len(self.envs), obs_pad), np.float32)

    @classmethod
    def from_specs(cls, specs: Sequence[EnvSpec], obs_pad: int) -> "LocalEnvs":
        return cls([build_env(s) for s in specs], obs_pad)

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self) -> np.ndarray:
        from agent.envs import pad_obs

        self.obs[:] = np.stack([pad_obs(env.reset(), self.obs_pad) for env in self.envs])
        return self.obs.copy()

    def step(self, actions: np.ndarray, running: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reward = np.zeros(len(self.envs), np.float64)
        done = np.ones(len(self.envs), bool)
        for i in np.flatnonzero(running):
            env = self.envs[i]
            o, r, terminated, truncated, _ = env.step(actions[i, :env.action_dim])
            self.obs[i, :env.obs_dim] = o
            reward[i] = r
            done[i] = bool(terminated or truncated)
        return self.obs.copy(), reward, done

    def close(self) -> None:
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "LocalEnvs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker(conn, specs: list[EnvSpec], obs_pad: int) -> None:
    """A worker's loop: build its slice, then answer reset / step / close until told to exit."""
    try:
        group = LocalEnvs.from_specs(specs, obs_pad)
        conn.send(("ready", None))
        while True:
            command, payload = conn.recv()
            if command == "reset":
                conn.send(("ok", group.reset()))
            elif command == "step":
                conn.send(("ok", group.step(*payload)))
            elif command == "close":
                group.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
    except (EOFError, KeyboardInterrupt):  # the parent went away: nothing to answer
        return
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, EOFError):
            pass
    finally:
        conn.close()


class EnvWorkerError(RuntimeError):
    """A worker failed (its traceback is in the message) or died."""


class EnvWorkers:
    """`specs` split into `workers` contiguous slices, each stepped by one spawned process. The
    same interface as LocalEnvs; use as a context manager (or call close()) so the workers are
    always joined."""

    def __init__(self, specs: Sequence[EnvSpec], workers: int, obs_pad: int, context: str = "spawn"):
        specs = list(specs)
        if workers < 1:
            raise ValueError(f"EnvWorkers needs workers >= 1, got {workers}")
        workers = min(workers, len(specs))
        bounds = [round(i * len(specs) / workers) for i in range(workers + 1)]
        self.slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        self.num_envs, self.obs_pad = len(specs), obs_pad
        self.processes: list = []
        self.conns: list = []
        ctx = mp.get_context(context)
        try:
            for part in self.slices:
                parent, child = ctx.Pipe()
                process = ctx.Process(target=_worker, args=(child, specs[part], obs_pad), daemon=True,
                                      name=f"env-worker-{len(self.processes)}")
                process.start()
                child.close()
                self.processes.append(process)
                self.conns.append(parent)
            for k in range(len(self.conns)):
                self._receive(k)  # "ready": every env built (a bad task name fails here)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self.num_envs

    def _receive(self, k: int):
        try:
            status, payload = self.conns[k].recv()
        except (EOFError, OSError):
            code = self.processes[k].exitcode
            raise EnvWorkerError(f"environment worker {k} died (exit code {code})") from None
        if status == "error":
            raise EnvWorkerError(f"environment worker {k} failed:\n{payload}")
        return payload

    def _all(self, messages: list) -> list:
        for conn, message in zip(self.conns, messages):
            conn.send(message)
        return [self._receive(k) for k in range(len(self.conns))]

    def reset(self) -> np.ndarray:
        return np.concatenate(self._all([("reset", None)] * len(self.conns)))

    def step(self, actions: np.ndarray, running: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = self._all([("step", (actions[s], running[s])) for s in self.slices])
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def close(self) -> None:
        """Ask every worker to exit, wait for it, terminate (then kill) any that does not."""
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except (OSError, BrokenPipeError):
                pass
        for process in self.processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        for process in self.processes:
            process.close()
        self.processes, self.conns = [], []

    def __enter__(self) -> "EnvWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def env_group(specs: Sequence[EnvSpec], obs_pad: int, workers: int = 0):
    """LocalEnvs (workers 0) or EnvWorkers with min(workers, len(specs)) processes."""
    if workers < 0:
        raise ValueError(f"env workers must be >= 0, got {workers}")
    if workers == 0:
        return LocalEnvs.from_specs(specs, obs_pad)
    return EnvWorkers(specs, workers, obs_pad)
