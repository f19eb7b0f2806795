"""Batched MPPI planning with a TD-MPC2 world model (official semantics), plus policy-prior acting.

One `act` call plans for E environments of any mix of tasks, and of several models of one
architecture (the members of a population: `Agent([model_0, ..., model_K-1])` and
`set_env_keys(..., members=...)`), each environment planning with its own member's weights.
Per-environment warm-start state (the previous plan's mean) lives in the agent.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from agent import compiled, ops
from agent.config import PlannerConfig, discount_for
from agent.rollout import PlanningKernels
from agent.runtime import keep_freed_memory
from agent.world_model import WorldModel


class Agent:
    """Acts with a world model: MPPI (cfg.mpc) or the policy prior.

    `Agent(model, **overrides)` — overrides are PlannerConfig fields (iterations, num_samples,
    num_elites, num_pi_trajs, horizon, min_std, max_std, temperature, mpc, ...).

    Randomness: every environment slot has its own random stream, seeded from (`seed`, key);
    keys default to the slot index and can be set with `set_env_keys` (e.g. one key per
    (task, episode)), so an environment plans the same whether it runs alone or in a batch.
    With `seed=None` the streams are seeded from torch's global generator. The pair of Q heads
    used for the terminal value is the only draw shared by the environments of one member (moot
    for num_q = 2).

    Several models (same architecture): `Agent([m0, m1, ...])`; `set_env_keys(keys, seeds, members)`
    then says which member plans for each environment (members' environments contiguous, in member
    order) and seeds each environment's stream from its own seed, so an environment plans as it
    would in an agent of its member alone. `model` is the first member.
    """

    def __init__(self, model: WorldModel | Sequence[WorldModel], seed: int | None = None, compile: str = "auto",
                 **overrides: Any):
        keep_freed_memory()
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not self.models:
            raise ValueError("Agent: no model given")
        self.model = self.models[0]
        self.cfg = PlannerConfig().override(**overrides)
        # torch path only: the value estimate as `agent.compiled.reference_value` under torch.compile
        # ("auto": on CUDA; "reduce-overhead" CUDA graphs there unless compile_mode says otherwise)
        compiled.check_setting(compile)
        self.compile, self.compile_mode = compile, None
        self._compiled_value: compiled.Compiled | None = None
        self.discount = discount_for(self.cfg.episode_length, self.cfg.discount_denom, self.cfg.discount_min,
                                     self.cfg.discount_max)
        self._prev_mean: torch.Tensor | None = None  # (E, horizon, action_dim)
        # threads for value estimation (None: torch's thread count): OpenMP threads of the native
        # one-call estimate, or, on the torch path, Python threads each running chunks of rows with
        # single-threaded torch ops (small GEMMs scale poorly across cores; independent chunks scale well)
        self.workers: int | None = None
        # torch path only: rows per chunk (at most; fewer when that leaves a worker idle)
        self.chunk_rows = 2048
        self.seed = seed
        self._env_keys: list[int] | None = None
        self._env_seeds: list[int] | None = None  # per environment, else `seed` for all
        self._groups: list[tuple[int, slice]] = [(0, slice(None))]  # (member, its environments)
        self._streams: list[torch.Generator] | None = None
        self._head_stream: torch.Generator | None = None
        self._member_head_streams: dict[int, torch.Generator] = {}

    def set_env_keys(self, keys: list[int], seeds: list[int] | None = None, members: list[int] | None = None) -> None:
        """Give environment slot i the random stream of (`seeds[i]` or the agent's seed, `keys[i]`)
        and the weights of member `members[i]` (default 0; contiguous and non-decreasing); fresh
        streams, warm starts reset."""
        self._env_keys = [int(k) for k in keys]
        if seeds is not None and len(seeds) != len(keys):
            raise ValueError(f"set_env_keys: {len(seeds)} seeds for {len(keys)} environments")
        self._env_seeds = None if seeds is None else [int(s) for s in seeds]
        self._groups = self._member_groups(members, len(keys))
        self._streams = None
        self._prev_mean = None

    def _member_groups(self, members: list[int] | None, num_envs: int) -> list[tuple[int, slice]]:
        if members is None:
            return [(0, slice(None))]
        if len(members) != num_envs:
            raise ValueError(f"set_env_keys: {len(members)} members for {num_envs} environments")
        groups: list[tuple[int, slice]] = []
        for i, k in enumerate(members):
            if not 0 <= k < len(self.models):
                raise ValueError(f"set_env_keys: member {k} out of range (the agent has {len(self.models)} models)")
            if groups and groups[-1][0] == k:
                groups[-1] = (k, slice(groups[-1][1].start, i + 1))
            elif groups and k < groups[-1][0]:
                raise ValueError("set_env_keys: each member's environments must be contiguous, in member order")
            else:
                groups.append((k, slice(i, i + 1)))
        return groups if len(groups) > 1 else [(groups[0][0], slice(None))]

    def rng_state(self) -> dict[str, Any]:
        """The planner's random streams (tensors and lists only), for exact resumption."""
        return {"streams": None if self._streams is None else [g.get_state() for g in self._streams],
                "env_keys": self._env_keys,
                "head": None if self._head_stream is None else self._head_stream.get_state()}

    def load_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what `rng_state` returned (warm starts are not part of it)."""

        def generator(saved: torch.Tensor, device) -> torch.Generator:
            g = torch.Generator(device=device)
            g.set_state(saved)
            return g

        self._env_keys = state.get("env_keys")
        streams = state.get("streams")
        self._streams = None if streams is None else [generator(s, self.device) for s in streams]
        head = state.get("head")
        self._head_stream = None if head is None else generator(head, "cpu")

    def _q_heads(self, device: torch.device, seed: int | None = None) -> torch.Tensor:
        """Two distinct Q-head indices from the agent's own stream (never torch's global one), or,
        given a member's `seed`, from that member's stream (as an agent with that seed would draw)."""
        if seed is not None and seed != self.seed:
            if seed not in self._member_head_streams:
                self._member_head_streams[seed] = torch.Generator(device="cpu").manual_seed((seed * 7_919 + 17) % 2**63)
            return ops.q_pair(self.model.cfg.num_q, device, generator=self._member_head_streams[seed])
        if self._head_stream is None:
            base = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._head_stream = torch.Generator(device="cpu").manual_seed((base * 7_919 + 17) % 2**63)
        return ops.q_pair(self.model.cfg.num_q, device, generator=self._head_stream)

    def _env_streams(self, num_envs: int, device: torch.device) -> list[torch.Generator]:
        if self._streams is None or len(self._streams) != num_envs:
            keys = self._env_keys if self._env_keys is not None and len(self._env_keys) == num_envs else range(num_envs)
            if self._env_seeds is not None and len(self._env_seeds) == num_envs:
                bases = self._env_seeds
            else:
                base = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
                bases = [base] * num_envs
            self._streams = [torch.Generator(device=device).manual_seed((base * 1_000_003 + key) % 2**63)
                             for base, key in zip(bases, keys)]
        return self._streams

    @staticmethod
    def _randn(streams: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """One standard-normal block per environment: (E, *shape), env i from stream i."""
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in streams])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        """Forget every environment's warm start."""
        self._prev_mean = None

    @torch.inference_mode()
    def act(self, obs: torch.Tensor, task: torch.Tensor | None = None, t0: torch.Tensor | bool = True,
            eval_mode: bool = True) -> torch.Tensor:
        """obs: (E, obs_dim) float32; task: (E,) int64; t0: (E,) bool (True where an episode just
        started) or one bool for all. Returns actions (E, action_dim) in [-1, 1], zero beyond
        each task's action dim."""
        training = [m for m in self.models if m.training]
        for m in training:  # module traversal is not free: switch only when needed
            m.eval()
        # SimNorm/exp produce float32 denormals, which are ~20x slower to multiply on x86
        torch.set_flush_denormal(True)
        try:
            obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
            if obs.dim() == 1:
                obs = obs.unsqueeze(0)
            num_envs = obs.shape[0]
            if task is not None:
                task = torch.as_tensor(task, dtype=torch.long, device=self.device).reshape(num_envs)
            elif self.model.multitask:
                raise ValueError("a multi-task model needs task ids (E,)")
            t0 = torch.as_tensor(t0, dtype=torch.bool, device=self.device).expand(num_envs)
            if self.cfg.mpc:
                return self._plan(obs, task, t0, eval_mode)
            action_dim = self.model.cfg.action_dim
            eps = None if eval_mode else self._randn(self._env_streams(num_envs, obs.device), (action_dim,), obs.device)
            actions = []
            for k, envs in self._groups_for(num_envs):
                model, task_k = self.models[k], _rows(task, envs)
                action, info = model.pi(model.encode(obs[envs], task_k), task_k, eps=_rows(eps, envs))
                action = info["mean"] if eval_mode else action
                mask = model.action_mask(task_k)
                actions.append(action * mask if mask is not None else action)
            return actions[0] if len(actions) == 1 else torch.cat(actions)
        finally:
            for m in training:
                m.train(True)
            torch.set_flush_denormal(False)

    def _groups_for(self, num_envs: int) -> list[tuple[int, slice]]:
        """(member, environments) pairs of a call with `num_envs` environments."""
        if len(self._groups) > 1 and self._groups[-1][1].stop != num_envs:
            raise ValueError(f"act: {num_envs} environments, but set_env_keys gave members for {self._groups[-1][1].stop}")
        return self._groups

    def _group_seed(self, envs: slice) -> int | None:
        """The seed of the member planning for `envs` (None: the agent's own)."""
        return None if self._env_seeds is None or envs == slice(None) else self._env_seeds[envs.start]

    def _plan(self, obs: torch.Tensor, task: torch.Tensor | None, t0: torch.Tensor, eval_mode: bool) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        E, H, S, P, K = obs.shape[0], cfg.horizon, cfg.num_samples, cfg.num_pi_trajs, cfg.num_elites
        A = model.cfg.action_dim
        streams = self._env_streams(E, obs.device)
        # one PlanningKernels per member, each over its own environments (one group: all of them)
        groups = [(envs, PlanningKernels(self.models[k], _rows(task, envs), _count(envs, E)))
                  for k, envs in self._groups_for(E)]
        z0 = _cat([nets.encode(obs[envs], _rows(task, envs)) for envs, nets in groups])  # (E, L)
        env_mask = model.action_mask(task) if model.multitask else torch.ones(E, A, device=obs.device)  # (E, A)

        # policy-prior trajectories: (H, E, P, A)
        actions = torch.empty(H, E, S, A, device=obs.device)
        if P > 0:
            zs = [z0[envs].repeat_interleave(P, 0) for envs, _ in groups]
            mask_p = env_mask.repeat_interleave(P, 0)
            for t in range(H):
                eps = self._randn(streams, (P, A), obs.device).view(E * P, A)
                for g, (envs, nets) in enumerate(groups):
                    rows, n = _scaled(envs, P), _count(envs, E)
                    actions[t, envs, :P] = nets.pi(zs[g], mask_p[rows], eps=eps[rows]).view(n, P, A)
                    if t < H - 1:
                        zs[g] = nets.step(zs[g], actions[t, envs, :P].reshape(n * P, A))[1]

        mean = torch.zeros(E, H, A, device=obs.device)
        std = torch.full((E, H, A), cfg.max_std, device=obs.device)
        if self._prev_mean is not None and self._prev_mean.shape == mean.shape:
            keep = ~t0
            mean[keep, :-1] = self._prev_mean[keep, 1:]
        z_samples = z0.repeat_interleave(S, 0)  # (E * S, L)
        task_s = task.repeat_interleave(S, 0) if task is not None else None
        mask_s = env_mask.repeat_interleave(S, 0)
        mask_b = env_mask.view(1, E, 1, A)
        for _ in range(cfg.iterations):
            noise = self._randn(streams, (H, S - P, A), obs.device).transpose(0, 1)  # (H, E, S - P, A)
            sampled = mean.transpose(0, 1).unsqueeze(2) + std.transpose(0, 1).unsqueeze(2) * noise
            actions[:, :, P:] = sampled.clamp(-1, 1)
            actions.mul_(mask_b)
            terminal_eps = self._randn(streams, (S, A), obs.device).view(E * S, A)
            if len(groups) == 1:
                value = self._estimate_value(groups[0][1], z_samples, actions.view(H, E * S, A), mask_s,
                                             terminal_eps, task_s)
            else:  # each member's value estimate over its own rows
                value = torch.cat([self._estimate_value(
                    nets, z_samples[_scaled(envs, S)], actions[:, envs].reshape(H, _count(envs, E) * S, A).contiguous(),
                    mask_s[_scaled(envs, S)], terminal_eps[_scaled(envs, S)], _rows(task_s, _scaled(envs, S)),
                    head_seed=self._group_seed(envs)) for envs, nets in groups])
            value = value.nan_to_num(0).view(E, S)
            elite_value, elite_idx = torch.topk(value, K, dim=1)  # (E, K)
            elite_actions = torch.gather(actions, 2, elite_idx.view(1, E, K, 1).expand(H, E, K, A))  # (H, E, K, A)
            score = torch.exp(cfg.temperature * (elite_value - elite_value.max(1, keepdim=True).values))
            score = score / score.sum(1, keepdim=True)  # (E, K)
            weights = score.view(1, E, K, 1)
            denom = score.sum(1).view(1, E, 1) + 1e-9
            mean_h = (weights * elite_actions).sum(2) / denom  # (H, E, A)
            std_h = ((weights * (elite_actions - mean_h.unsqueeze(2)) ** 2).sum(2) / denom).sqrt()
            mean = (mean_h * env_mask).transpose(0, 1)
            std = (std_h.clamp(cfg.min_std, cfg.max_std) * env_mask).transpose(0, 1)

        # one elite per env, drawn by score
        chosen = torch.cat([torch.multinomial(score[e], 1, generator=g) for e, g in enumerate(streams)])
        action = elite_actions[0, torch.arange(E, device=obs.device), chosen]  # (E, A)
        if not eval_mode:
            action = action + std[:, 0] * self._randn(streams, (A,), obs.device)
        self._prev_mean = mean.clone()
        return action.clamp(-1, 1)

    def _estimate_value(self, nets: PlanningKernels, z: torch.Tensor, actions: torch.Tensor,
                        mask: torch.Tensor, terminal_eps: torch.Tensor | None = None,
                        task: torch.Tensor | None = None, head_seed: int | None = None) -> torch.Tensor:
        """z: (E * S, L), actions: (H, E * S, A) -> discounted return + terminal value (E * S, 1);
        terminal_eps: (E * S, A) policy noise of the terminal action (drawn if None); task: (E * S,)
        the rows' task ids (needed by the compiled path of a multi-task model); head_seed: the
        member whose Q-head stream draws the terminal pair (None: the agent's own).

        On CPU with the native kernels, one `native.ValueNet` call does it all (blocks of rows on
        `self.workers` OpenMP threads); else, with `compile` on (auto: CUDA), all rows in one call
        of the compiled `agent.compiled.reference_value`; otherwise rows are processed in chunks
        (`row_chunks`) spread over `self.workers` Python threads."""
        samples = self.cfg.num_samples
        heads = self._q_heads(z.device) if head_seed is None else self._q_heads(z.device, head_seed)
        workers = max(1, self.workers or torch.get_num_threads()) if z.device.type == "cpu" else 1
        if terminal_eps is not None:
            value_net = nets.value_net(heads, samples, actions.shape[0], self.discount)
            if value_net is not None:  # the whole estimate in one native call
                return value_net(z, actions, mask, terminal_eps, threads=workers)
        if compiled.wanted(self.compile, z.device) and (task is not None or not self.model.multitask):
            if self._compiled_value is None:
                self._compiled_value = compiled.Compiled(
                    compiled.reference_value, "torch.compile of the MPPI value estimate",
                    compiled.resolve_mode(self.compile_mode, z.device, cuda_default="reduce-overhead"))
            return self._compiled_value(nets.model, z, actions, task, terminal_eps, heads, self.discount)
        out = torch.empty(z.shape[0], 1, device=z.device)

        def run(chunks: list[tuple[slice, slice]]) -> None:
            for rows, envs in chunks:
                z_chunk, ret, discount = z[rows], 0.0, 1.0
                for t in range(actions.shape[0]):
                    reward, z_chunk = nets.step(z_chunk, actions[t, rows], envs)
                    ret = ret + discount * reward
                    discount *= self.discount
                eps = None if terminal_eps is None else terminal_eps[rows]
                out[rows] = ret + discount * nets.q_avg(z_chunk, nets.pi(z_chunk, mask[rows], envs, eps=eps), envs, heads)

        chunk_rows = max(1, min(self.chunk_rows, -(-z.shape[0] // workers)))
        chunks = row_chunks(nets.E, samples, chunk_rows)
        workers = min(workers, len(chunks))
        if workers <= 1:
            run(chunks)
        else:
            _run_threaded(run, [chunks[i::workers] for i in range(workers)])
        return out


def _rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return x if x is None or rows == slice(None) else x[rows]


def _count(envs: slice, num_envs: int) -> int:
    return num_envs if envs == slice(None) else envs.stop - envs.start


def _scaled(envs: slice, per_env: int) -> slice:
    """The rows of `envs` in an environment-major layout with `per_env` rows per environment."""
    return envs if envs == slice(None) else slice(envs.start * per_env, envs.stop * per_env)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_POOL: ThreadPoolExecutor | None = None


def _run_threaded(fn, parts: list[list]) -> None:
    """fn(part) for every part on a shared thread pool, torch single-threaded inside each worker
    (chunks write disjoint rows; every random draw happened before, so results do not depend on
    the split)."""
    global _POOL
    if _POOL is None or _POOL._max_workers < len(parts):
        _POOL = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="planner")
    saved_threads = torch.get_num_threads()

    def work(part: list) -> None:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # per-thread FPU state
        with torch.inference_mode():
            fn(part)

    torch.set_num_threads(1)
    try:
        for future in [_POOL.submit(work, part) for part in parts]:
            future.result()
    finally:
        torch.set_num_threads(saved_threads)


def row_chunks(num_envs: int, rows_per_env: int, chunk_rows: int) -> list[tuple[slice, slice]]:
    """Split E * R environment-major rows into chunks of about `chunk_rows`: (rows, envs) pairs where
    `envs` are the environments the rows belong to (whole environments, or one environment cut
    into equal pieces when R > chunk_rows)."""
    if rows_per_env <= chunk_rows:
        per_chunk = max(1, chunk_rows // rows_per_env)
        return [(slice(first * rows_per_env, min(first + per_chunk, num_envs) * rows_per_env),
                 slice(first, min(first + per_chunk, num_envs))) for first in range(0, num_envs, per_chunk)]
    pieces = -(-rows_per_env // chunk_rows)
    bounds = [round(i * rows_per_env / pieces) for i in range(pieces + 1)]
    return [(slice(env * rows_per_env + lo, env * rows_per_env + hi), slice(env, env + 1))
            for env in range(num_envs) for lo, hi in zip(bounds[:-1], bounds[1:])]
