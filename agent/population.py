"""Population training: K students of one architecture trained as one batch in one process.

Every parameter, Adam moment and target-Q copy carries a leading member dim K. The update is the
reference one (`agent.losses.compute_losses` and `agent.train.policy_objective` on the reference
`WorldModel` methods), run by `torch.func`: `functional_call` puts member k's parameters into one
shared module and `vmap` batches it over the K members; one backward pass of the members' summed
losses gives each member its own gradient (a compiled step uses `grad` under `vmap`, the same
numbers; see `Population._per_member`). No second definition of
the network exists here; a member trains exactly as `agent.train.Trainer(fast_kernels=False)`
would train it on the same batches and noise (tests/test_population.py pins it).

On CPU in float32 (cfg.fast_kernels, not compiled) the modules' LayerNorm + Mish runs in the native
fused kernel, vmappable with the K members as its heads (`agent.ops.member_kernels`; within ~1e-6
of the torch ops, pinned too); with cfg.compile, inductor fuses the whole step instead.

Each member has its own batch source (own seed, own cached teacher targets) and its own torch
Generator for the policy noise of the TD target and of the policy loss; dropout and the random
Q-head pair (num_q > 2) draw from torch's global generator, independently per member
(vmap randomness="different").

    pop = Population([student_1, ..., student_K], TrainConfig(...), [source_1, ..., source_K], seeds=[1, ..., K])
    pop.train(1000)                  # -> per-member metrics
    pop.member(k)                    # WorldModel with member k's weights (for evaluation / saving)
    pop.save("pop.pt"); pop.load("pop.pt")
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from agent import native
from agent.checkpoint import atomic_torch_save, read_checkpoint
from agent.compiled import maybe_compile, wanted
from agent.config import PRECISIONS, ModelConfig, TrainConfig
from agent.distill import CACHEABLE, TeacherTargets
from agent.errors import CheckpointError, ConfigError
from agent.losses import TrainBatch, as_batch, compute_losses, task_discounts
from agent.ops import fallback, member_kernels
from agent.runtime import flushed_denormals, keep_freed_memory
from agent.scale import RunningScale
from agent.train import model_param_groups, policy_objective, policy_param_names, set_scheduled_lr
from agent.world_model import WorldModel

POPULATION_FORMAT = "distill-sweeps/population"
POPULATION_VERSION = 1
TARGET_PREFIX, ONLINE_Q_PREFIX = "_target_Qs.", "_Qs."
# Targets whose loss trains only the model parameters from cached or live teacher outputs. `policy`
# (trains the policy prior inside the model loss) and `latent_linear` (a trainable projection) are
# served by separate Trainers.
POPULATION_TARGETS = (None, "reward", "reward_observed", "reward_multistep", "value", "latent_pca")


class _ModelLoss(nn.Module):
    """The model loss of one member as a module call (what functional_call needs): returns
    (weighted total (), unweighted terms {name: ()}, latent rollout zs (H+1, B, L))."""

    def __init__(self, model: WorldModel, teacher: WorldModel | None, target: str | None, cfg: TrainConfig, pca: Any):
        super().__init__()
        self.model, self.cfg, self.target, self.pca = model, cfg, target, pca
        self.teacher = [teacher]  # a list: not a registered submodule, so functional_call leaves it alone

    def forward(self, obs, action, reward, task, teacher_reward, teacher_latent, eps_td, discount):
        cached = TeacherTargets(reward=teacher_reward, latent=teacher_latent)
        batch = TrainBatch(obs, action, reward, task, cached if teacher_reward is not None or teacher_latent is not None else None)
        c = self.cfg
        out = compute_losses(self.model, batch, self.teacher[0], self.target, loss_cfg=c.loss, discount=discount,
                             eps_td=eps_td, pca=self.pca, fast=False)
        t = out.terms
        total = c.loss.consistency_coef * t["consistency"] + c.loss.reward_coef * t["reward"] \
            + c.loss.value_coef * t["value"] + c.distill.d_coef * t["distill"]
        return total, (t, out.zs)


class _PolicyLoss(nn.Module):
    """The policy prior's loss of one member (agent.train.policy_objective) as a module call."""

    def __init__(self, model: WorldModel, cfg: TrainConfig, scale: RunningScale):
        super().__init__()
        self.model, self.cfg, self.scale = model, cfg, scale

    def forward(self, zs, task, eps_pi, scale_value):
        loss, value, entropy = policy_objective(self.model, zs, task, eps_pi, self.scale, scale_value, self.cfg.loss,
                                                fast=False)
        return loss, (value, entropy)


def _tracing() -> bool:
    """Whether dynamo is tracing this call (a compiled step): the one place `_per_member` asks, so a
    test can take the traced branch eagerly by replacing this function, not torch's own."""
    return torch.compiler.is_compiling()


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _stack(values: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if values[0] is None else torch.stack(list(values))


class _Members:
    """`train` for the two member executors (Population, SeparateMembers): both have `update()`
    -> each member's metrics, and `step`."""

    def train(self, steps: int, callback: Callable[[int, list[dict[str, float]]], Any] | None = None) -> list[dict[str, float]]:
        """Run `steps` updates of every member from its batch source; callback(step, metrics) after each."""
        metrics: list[dict[str, float]] = []
        for _ in range(steps):
            metrics = self.update()
            if callback is not None:
                callback(self.step, metrics)
        return metrics


class Population(_Members):
    """K students (same ModelConfig) trained as one batch; see the module docstring.

    models: K WorldModels (their weights are copied in; the objects are not trained in place).
    cfg: the members' shared TrainConfig (its `seed` is unused: `seeds` seed the noise generators).
    batch_sources: K zero-argument callables returning a batch each (own seed, own teacher
    targets); optional if every `update()` passes its batches.
    teacher: a live teacher WorldModel shared by the members, or None (cached targets in the
    batches, or no distillation: `cfg.distill.target` None or d_coef 0 trains on TD-MPC2 alone).
    """

    def __init__(self, models: Sequence[WorldModel], cfg: TrainConfig, batch_sources: Sequence[Callable[[], Any]] | None = None,
                 teacher: WorldModel | None = None, *, seeds: Sequence[int] | None = None, cached_teacher: bool = False,
                 pca: Any = None, precision: str = "fp32"):
        self.cfg = cfg.validate()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if not models:
            raise ConfigError("a population needs at least one member")
        if precision == "bf16" and next(models[0].parameters()).device.type != "cuda":
            # CPU autocast under torch.func.grad fails in backward (mixed bf16/fp32 operands)
            raise ConfigError("precision bf16 is a CUDA option; on CPU train in fp32")
        model_cfg = models[0].cfg
        if any(m.cfg != model_cfg for m in models):
            raise ConfigError("population members must share one model config")
        self.target = cfg.distill.target if (teacher is not None or cached_teacher) else None
        if self.target not in POPULATION_TARGETS:
            raise ConfigError(f"the population executor cannot serve distillation target {self.target!r} "
                              f"(it serves {', '.join(str(t) for t in POPULATION_TARGETS)}); train the members separately")
        self.K = len(models)
        self.batch_sources = list(batch_sources) if batch_sources is not None else None
        if self.batch_sources is not None and len(self.batch_sources) != self.K:
            raise ConfigError(f"population: {self.K} members but {len(self.batch_sources)} batch sources")
        keep_freed_memory()
        # the shared module functional_call runs: structure only, its own weights are never used
        self.base = copy.deepcopy(models[0])
        self.device = next(self.base.parameters()).device
        self.max_norm = self.base._task_emb.max_norm if self.base.multitask else None
        if self.base.multitask:
            self.base._task_emb.max_norm = None  # renormalised explicitly per member (`_renorm_task_emb`)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.scale = RunningScale(cfg.tau)
        self._model_loss = _ModelLoss(self.base, self.teacher, self.target, cfg, pca)
        self._policy_loss = _PolicyLoss(self.base, cfg, self.scale)

        names = [n for n, _ in self.base.named_parameters()]
        stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).clone() for n in names}
        self.params = {n: v for n, v in stacked.items() if not n.startswith(TARGET_PREFIX)}
        self.targets = {n: v for n, v in stacked.items() if n.startswith(TARGET_PREFIX)}
        self.pi_names = policy_param_names(self.params)
        self.model_names = [n for n in self.params if n not in self.pi_names]
        self.optim = torch.optim.Adam(model_param_groups({n: self.params[n] for n in self.model_names}, cfg), lr=cfg.lr,
                                      fused=cfg.fused_adam)
        self.pi_optim = torch.optim.Adam([self.params[n] for n in self.pi_names], lr=cfg.lr, eps=cfg.pi_adam_eps,
                                         fused=cfg.fused_adam)
        self.scale_values = torch.ones(self.K, 1, device=self.device, dtype=self.params["_pi.0.weight"].dtype)
        self.discount = task_discounts(model_cfg, cfg.loss, self.device)
        self.seeds = list(seeds) if seeds is not None else list(range(self.K))
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in self.seeds]
        self.step = 0
        self._rate_window: list[float] = []
        self.fused = self._use_member_kernels(cfg, precision)
        self._model_update = maybe_compile(self._model_step, "torch.compile of the population's model update",
                                           cfg.compile, self.device, cfg.compile_mode)
        self._policy_update = maybe_compile(self._policy_step, "torch.compile of the population's policy update",
                                            cfg.compile, self.device, cfg.compile_mode)

    def _use_member_kernels(self, cfg: TrainConfig, precision: str) -> bool:
        """Whether the modules' LayerNorm + Mish runs in the native member kernel: CPU float32
        populations with cfg.fast_kernels and no torch.compile (which fuses the step itself). A
        CPU population the kernel cannot serve says why, once."""
        if not cfg.fast_kernels or wanted(cfg.compile, self.device) or self.device.type != "cpu":
            return False
        dtype = self.params["_pi.0.weight"].dtype
        if dtype is not torch.float32 or precision != "fp32":
            fallback("population: fused LayerNorm + Mish -> torch ops",
                     f"the native kernels take float32, the population trains in {dtype if precision == 'fp32' else precision}")
            return False
        return native.available()  # unavailable: loading the kernels said why

    # -- functional calls (one member; vmapped over K) ----------------------------------------
    @staticmethod
    def _per_member(fn: Callable, *args: Any) -> Any:
        """Each member's gradient of fn with respect to its own slice of args[0] -> (grads, (loss,
        aux)): every tensor argument has a leading K dim, except the last (shared); None arguments
        (no task ids, no cached targets) stay None; the other arguments are constants.

        Eager: the members' losses through vmap(fn), then one backward pass of their sum (member
        k's loss depends on its own parameter slice only, so the gradient of the sum is each
        member's own gradient; the same numbers as grad under vmap, and faster on CPU, where
        torch.func wraps every call of the native member kernel, an autograd.Function, in a class
        built per call). Under torch.compile: vmap(grad_and_value(fn)), which dynamo traces as one
        graph (torch.autograd.grad would split the step)."""
        dims = tuple(None if a is None else 0 for a in args[:-1]) + (None,)
        if _tracing():
            return vmap(grad_and_value(fn, has_aux=True), in_dims=dims, randomness="different")(*args)
        params = {n: p.detach().requires_grad_(True) for n, p in args[0].items()}
        constants = tree_map(_detached, args[1:])
        with torch.enable_grad():
            loss, aux = vmap(fn, in_dims=dims, randomness="different")(params, *constants)
            grads = torch.autograd.grad(loss.sum(), list(params.values()), allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
        return grads, (loss.detach(), tree_map(_detached, aux))

    # the two vmapped steps, each its own function: what cfg.compile compiles (agent.compiled;
    # one def each, so torch.compile keeps one cache per step)
    def _model_step(self, *args: Any) -> Any:
        return self._per_member(self._model_call, *args)

    def _policy_step(self, *args: Any) -> Any:
        return self._per_member(self._policy_call, *args)

    def _model_call(self, params, fixed, obs, action, reward, task, teacher_reward, teacher_latent, eps_td, discount):
        weights = {f"model.{n}": v for n, v in {**params, **fixed}.items()}
        return functional_call(self._model_loss, weights, (obs, action, reward, task, teacher_reward, teacher_latent,
                                                           eps_td, discount))

    def _policy_call(self, pi_params, other, zs, task, eps_pi, scale_value, _shared=None):
        weights = {f"model.{n}": v for n, v in {**other, **pi_params}.items()}
        return functional_call(self._policy_loss, weights, (zs, task, eps_pi, scale_value))

    # -- one update ---------------------------------------------------------------------------
    def _batches(self, batches: Sequence[Any] | None) -> list[TrainBatch]:
        if batches is None:
            if self.batch_sources is None:
                raise ConfigError("Population has no batch sources; pass the members' batches to update()")
            batches = [source() for source in self.batch_sources]
        if len(batches) != self.K:
            raise ConfigError(f"population: {self.K} members but {len(batches)} batches")
        return [as_batch(b) for b in batches]

    @torch.no_grad()
    def _renorm_task_emb(self, task: torch.Tensor | None) -> None:
        """nn.Embedding(max_norm=1)'s in-place renormalisation of the rows a lookup touches, per
        member (torch's own op): what each member's embedding lookups would do before the loss."""
        if self.max_norm is None or task is None:
            return
        weight = self.params["_task_emb.weight"]
        for k in range(self.K):
            torch.embedding_renorm_(weight[k], task[k], self.max_norm, 2.0)

    def _to_device(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Host batches go to a CUDA device from pinned memory, without blocking the host."""
        if x is None or x.device == self.device:
            return x
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(K, *shape) standard normal, member k from its own generator."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def _clip(self, names: list[str], grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-member clip_grad_norm_ over `names`: returns the members' total norms (K,)."""
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[n].reshape(self.K, -1), dim=1)
                                                      for n in names]), dim=0)
        coef = torch.clamp(self.cfg.grad_clip_norm / (norms + 1e-6), max=1.0)
        for n in names:
            # contiguous: vmap may return a permuted layout, and the fused Adam kernel walks grad
            # and parameter memory in the same order
            self.params[n].grad = (grads[n] * coef.view(-1, *[1] * (grads[n].dim() - 1))).contiguous()
        return norms

    def update(self, batches: Sequence[Any] | None = None, eps_td: torch.Tensor | None = None,
               eps_pi: torch.Tensor | None = None) -> list[dict[str, float]]:
        """One update of every member; returns each member's metrics (as Trainer.update's).
        eps_td (K, H, B, A) / eps_pi (K, H+1, B, A): policy noise (drawn from the members' generators if None)."""
        started = time.perf_counter()
        with flushed_denormals(self.cfg.flush_denormal):
            metrics = self._update(batches, eps_td, eps_pi)
        elapsed = time.perf_counter() - started
        self._rate_window = (self._rate_window + [elapsed])[-50:]
        rate = len(self._rate_window) / sum(self._rate_window)
        for m in metrics:
            m.update(update_ms=1000 * elapsed, updates_per_s=rate)
        return metrics

    def _update(self, batches, eps_td, eps_pi) -> list[dict[str, float]]:
        bs = self._batches(batches)
        move = self._to_device
        obs, action, reward = (move(_stack([getattr(b, f) for b in bs])) for f in ("obs", "action", "reward"))
        task = move(_stack([b.task for b in bs]))
        cached = [b.teacher or TeacherTargets() for b in bs]
        teacher_reward = move(_stack([c.reward for c in cached]))
        teacher_latent = move(_stack([c.latent for c in cached]))
        field = CACHEABLE.get(self.target or "")
        if self.target is not None and self.teacher is None and (field is None or
                                                                  {"reward": teacher_reward, "latent": teacher_latent}[field] is None):
            raise ConfigError(f"distillation target {self.target!r}: no live teacher and no cached teacher outputs in the batches")
        H, B, A = action.shape[1:]
        eps_td = self._noise((H, B, A)) if eps_td is None else eps_td.to(self.device)
        eps_pi = self._noise((H + 1, B, A)) if eps_pi is None else eps_pi.to(self.device)

        set_scheduled_lr((self.optim, self.pi_optim), self.cfg, self.step)
        self.base.train()
        self._renorm_task_emb(task)
        model_params = {n: self.params[n] for n in self.model_names}
        pi_params = {n: self.params[n] for n in self.pi_names}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"), \
                member_kernels(self.fused):
            grads, (total, (terms, zs)) = self._model_update(model_params, {**pi_params, **self.targets},
                                                             obs, action, reward, task, teacher_reward, teacher_latent,
                                                             eps_td, self.discount)
        if self.precision == "bf16":
            zs = zs.float()  # the policy loss runs in fp32
        grad_norm = self._clip(self.model_names, grads)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

        self._renorm_task_emb(task)
        other = {n: self.params[n] for n in self.model_names}
        with member_kernels(self.fused):
            pi_grads, (pi_loss, (self.scale_values, entropy)) = self._policy_update(pi_params, other, zs.detach(), task,
                                                                                    eps_pi, self.scale_values, None)
        pi_grad_norm = self._clip(self.pi_names, pi_grads)
        self.pi_optim.step()
        self.pi_optim.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, target in self.targets.items():
                target.lerp_(self.params[ONLINE_Q_PREFIX + name[len(TARGET_PREFIX):]], self.cfg.tau)
        self.base.eval()
        self.step += 1
        columns = {**{k: v.detach() for k, v in terms.items()}, "total": total.detach(), "grad_norm": grad_norm,
                   "pi_loss": pi_loss.detach(), "pi_grad_norm": pi_grad_norm, "pi_scale": self.scale_values.squeeze(-1), "pi_entropy": entropy}
        table = {k: v.double().cpu().tolist() for k, v in columns.items()}
        return [{**{k: float(v[i]) for k, v in table.items()}, "step": float(self.step)} for i in range(self.K)]

    # -- members --------------------------------------------------------------------------------
    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's WorldModel state dict (parameters, target heads and buffers)."""
        state = self.base.state_dict()
        for name, value in {**self.params, **self.targets}.items():
            state[name] = value[k].detach().clone()
        return state

    def member(self, k: int) -> WorldModel:
        """A WorldModel holding member k's weights (a copy: training goes on in the population)."""
        model = WorldModel(self.base.cfg).to(self.device)
        model.load_state_dict(self.member_state_dict(k))
        return model.eval()

    def finite_members(self) -> list[bool]:
        """Whether each member's parameters are all finite (a diverged member is not)."""
        finite = torch.ones(self.K, dtype=torch.bool)
        for value in self.params.values():
            finite &= torch.isfinite(value.detach().reshape(self.K, -1)).all(dim=1).cpu()
        return finite.tolist()

    @torch.no_grad()
    def keep(self, members: Sequence[int]) -> None:
        """Drop every member not in `members` (e.g. diverged ones); the rest train on unchanged."""
        index = torch.as_tensor(list(members), dtype=torch.long, device=self.device)
        old = dict(self.params)
        for store in (self.params, self.targets):
            for name in store:
                store[name] = store[name][index].clone()
        name_of = {id(t): n for n, t in old.items()}
        for optim in (self.optim, self.pi_optim):
            for group in optim.param_groups:
                olds, group["params"] = group["params"], [self.params[name_of[id(p)]] for p in group["params"]]
                for p_old, p_new in zip(olds, group["params"]):
                    state = optim.state.pop(p_old, None)
                    if state:  # Adam moments carry the member dim; `step` is a shared scalar
                        optim.state[p_new] = {k: v[index] if torch.is_tensor(v) and v.dim() > 0 else v
                                              for k, v in state.items()}
        self.scale_values = self.scale_values[index]
        self.seeds = [self.seeds[i] for i in members]
        self.generators = [self.generators[i] for i in members]
        if self.batch_sources is not None:
            self.batch_sources = [self.batch_sources[i] for i in members]
        self.K = len(self.seeds)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a continuation needs (weights_only-safe)."""
        sources = self.batch_sources or []
        return {
            "format": POPULATION_FORMAT, "version": POPULATION_VERSION, "step": self.step,
            "model_config": self.base.cfg.to_dict(), "train_config": self.cfg.to_dict(), "seeds": self.seeds,
            "params": {n: v.detach().clone() for n, v in self.params.items()},
            "targets": {n: v.clone() for n, v in self.targets.items()},
            "optim": self.optim.state_dict(), "pi_optim": self.pi_optim.state_dict(),
            "scale_values": self.scale_values.clone(),
            "generators": [g.get_state() for g in self.generators],
            "torch_rng": torch.get_rng_state(),  # dropout and the Q-head pair draw from the global generator
            "batch_sources": [s.state_dict() if hasattr(s, "state_dict") else None for s in sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != POPULATION_FORMAT:
            raise CheckpointError("not a distill-sweeps population state")
        if state.get("version", 0) > POPULATION_VERSION:
            raise CheckpointError(f"population state written by a newer version ({state.get('version')})")
        if ModelConfig.from_dict(state["model_config"]) != self.base.cfg or list(state["seeds"]) != self.seeds:
            raise ConfigError("population state: the saved model config or member seeds differ from this population's")
        with torch.no_grad():
            for store, saved in ((self.params, state["params"]), (self.targets, state["targets"])):
                for name, value in saved.items():
                    store[name].copy_(value)
        self.optim.load_state_dict(state["optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale_values = state["scale_values"].clone().to(self.device)
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        torch.set_rng_state(state["torch_rng"])
        for source, saved in zip(self.batch_sources or [], state["batch_sources"]):
            if saved is not None:
                source.load_state_dict(saved)
        self.step = int(state["step"])

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_torch_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> "Population":
        self.load_state_dict(read_checkpoint(path))
        return self


class SeparateMembers(_Members):
    """The Population interface over K ordinary Trainers, one after another: for settings the
    population executor cannot serve (see POPULATION_TARGETS). Member k trains with seed seeds[k]."""

    def __init__(self, trainers: Sequence[Any], seeds: Sequence[int]):
        self.trainers, self.seeds = list(trainers), list(seeds)

    @property
    def K(self) -> int:
        return len(self.trainers)

    @property
    def step(self) -> int:
        return self.trainers[0].step

    def update(self) -> list[dict[str, float]]:
        return [t.update() for t in self.trainers]

    def member(self, k: int) -> WorldModel:
        return self.trainers[k].model

    def finite_members(self) -> list[bool]:
        return [all(bool(torch.isfinite(p).all()) for p in t.model.parameters()) for t in self.trainers]

    def keep(self, members: Sequence[int]) -> None:
        self.trainers = [self.trainers[i] for i in members]
        self.seeds = [self.seeds[i] for i in members]

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_torch_save({"format": POPULATION_FORMAT + "/separate", "seeds": self.seeds,
                                  "members": [t.state_dict() for t in self.trainers]}, path)

    def load(self, path: str | os.PathLike) -> "SeparateMembers":
        state = read_checkpoint(path)
        if state.get("format") != POPULATION_FORMAT + "/separate" or list(state["seeds"]) != self.seeds:
            raise CheckpointError(f"{path}: not a state of these separately trained members")
        for trainer, saved in zip(self.trainers, state["members"]):
            trainer.load_state_dict(saved)
        return self


def single_student_reason(members: int, cfg: TrainConfig, device: torch.device, precision: str) -> str | None:
    """Why one student trains in the single-student Trainer rather than a population of one, or
    None. On CPU in fp32 and uncompiled, the Trainer's fused update (`agent.train_kernels`: the
    task embedding folded into first layers, the Q heads in one GEMM) takes about half the time of
    a one-member population's (`benchmarks/population.py --cost-model`); on CUDA, in bf16 or
    compiled, only the population has those paths."""
    if members != 1 or device.type != "cpu" or precision != "fp32" or wanted(cfg.compile, device):
        return None
    return "one student: the single-student Trainer (faster on CPU than a population of one)"


def offline_members(models: Sequence[WorldModel], store: Any, cfg: TrainConfig, seeds: Sequence[int],
                    teacher_path: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                    precision: str = "fp32", population_of_one: bool = False):
    """K students (one per seed) training offline on `store` on their device: a Population when
    the executor can serve the setting, else SeparateMembers (and `log` says why). One student on
    CPU in fp32 trains in the single-student Trainer (`single_student_reason`) unless
    `population_of_one` (benchmarks time both executors). Batch source k is seeded seeds[k]."""
    from dataclasses import replace

    from agent.train import Trainer, offline_inputs

    device = next(models[0].parameters()).device
    inputs = offline_inputs(models[0], store, cfg, teacher_path, device=device)
    tasks = list(models[0].cfg.tasks)
    sources = [inputs.batches(int(s), tasks) for s in seeds]
    cached = inputs.cache is not None
    target = inputs.cfg.distill.target if (inputs.teacher is not None or cached) else None
    single = None if population_of_one else single_student_reason(len(models), inputs.cfg, device, precision)
    if target in POPULATION_TARGETS and single is None:
        return Population(models, inputs.cfg, sources, inputs.teacher, seeds=seeds, cached_teacher=cached, pca=inputs.pca,
                          precision=precision)
    if precision != "fp32":
        raise ConfigError(f"precision {precision!r} needs the population executor, which cannot serve target {target!r}")
    log(single or f"population executor: target {target!r} is not served; training the {len(models)} members one after another")
    return SeparateMembers([Trainer(m, replace(inputs.cfg, seed=int(s)), src, inputs.teacher, pca=inputs.pca,
                                    cached_teacher=cached) for m, s, src in zip(models, seeds, sources)], seeds)
