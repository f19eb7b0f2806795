"""torch.compile for the GPU paths: the population update and the planner's value estimate.

Both compiled functions are the reference code itself, not a second definition of the network:

* the population update compiles `Population._model_step` / `_policy_step`, i.e.
  vmap(grad_and_value(functional_call(reference WorldModel loss))) over the members, as one
  graph each (fullgraph: a graph break is a failure, reported, not a silent partial compile).
  On torch 2.13 dynamo traces torch.func's vmap + grad_and_value + functional_call whole,
  randomness="different" included; no per-member compile or dynamo option is needed;
* the planner compiles `reference_value`: MPPI's value estimate written on the WorldModel's own
  methods (reward / next / pi / Q), the definition every other value estimate is pinned to.
  The native one-call estimate (CPU) is left as it is.

Settings: `compile` is "auto" (on for CUDA, off for CPU), "on" or "off"; the mode defaults to
torch's "default" (inductor fusions, no autotuning: compile time stays ~a minute), and on CUDA the
planner uses "reduce-overhead" (CUDA graphs: one launch per value estimate). Modes that capture
CUDA graphs are refused on CPU. A compile that fails (no C compiler, an unsupported op, an
inductor bug) warns once naming the reason and the eager function runs from then on; an error
the eager function raises too is the computation's own and propagates (e.g. CUDA OOM, NaN weights).

`DISTILL_COMPILE_BACKEND` picks the dynamo backend (default "inductor"; the fast CPU tests use
"aot_eager": the same dynamo + AOTAutograd graph without inductor's C++ code generation).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from agent import math as tdmath
from agent import ops
from agent.config import COMPILE_MODES, COMPILE_SETTINGS
from agent.errors import ConfigError

CUDA_GRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")


BACKEND: str | Callable | None = None  # overrides DISTILL_COMPILE_BACKEND (tests set a callable)


def backend() -> str | Callable:
    """The dynamo backend: BACKEND, else $DISTILL_COMPILE_BACKEND, else "inductor"."""
    return BACKEND or os.environ.get("DISTILL_COMPILE_BACKEND", "inductor")


def check_setting(setting: str, mode: str | None = None) -> None:
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)} or null, got {mode!r}")


def wanted(setting: str, device: torch.device | str) -> bool:
    """Whether `setting` compiles on `device` (auto: on CUDA only)."""
    check_setting(setting)
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def resolve_mode(mode: str | None, device: torch.device | str, cuda_default: str = "default") -> str:
    """The torch.compile mode on `device`: `mode`, else `cuda_default` on CUDA / "default" elsewhere.
    CUDA-graph modes on a CPU device are a ConfigError."""
    device = torch.device(device)
    check_setting("auto", mode)
    chosen = mode or (cuda_default if device.type == "cuda" else "default")
    if chosen in CUDA_GRAPH_MODES and device.type != "cuda":
        raise ConfigError(f"compile_mode {chosen!r} captures CUDA graphs; on {device.type} use 'default'")
    return chosen


class Compiled:
    """`fn` under torch.compile, with a visible eager fallback (see the module docstring).

    what: the path's name for the warning. mode: torch.compile mode; with a CUDA-graph mode every
    call starts a new cudagraph step and returns clones of the outputs (callers may keep them
    across calls)."""

    def __init__(self, fn: Callable, what: str, mode: str = "default", fullgraph: bool = True,
                 dynamic: bool | None = None):
        self.fn, self.what, self.mode = fn, what, mode
        self.cuda_graphs = mode in CUDA_GRAPH_MODES
        self.failed: str | None = None  # why compiling failed (then fn runs eagerly)
        try:
            self.compiled = torch.compile(fn, mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend())
        except Exception as exc:  # e.g. the backend is unknown / unavailable here
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ops.fallback(f"{self.what} -> eager", self.failed)

    def __call__(self, *args: Any) -> Any:
        if self.failed is not None:
            return self.fn(*args)
        try:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return torch.utils._pytree.tree_map(
                    lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.compiled(*args))
            return self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise  # the eager function needs at least as much memory
        except Exception as exc:
            out = self.fn(*args)  # raises the computation's own error if it has one
            self._fail(exc)  # eager ran: the compiled path is what failed
            return out


def maybe_compile(fn: Callable, what: str, setting: str, device: torch.device | str, mode: str | None = None,
                  cuda_default: str = "default") -> Callable:
    """`fn` itself (setting off, or auto on CPU) or `Compiled(fn)` in the resolved mode."""
    if not wanted(setting, device):
        return fn
    return Compiled(fn, what, resolve_mode(mode, device, cuda_default))


def reference_value(model, z: torch.Tensor, actions: torch.Tensor, task: torch.Tensor | None,
                    terminal_eps: torch.Tensor | None, heads: torch.Tensor, discount: float) -> torch.Tensor:
    """MPPI's value estimate on the reference WorldModel methods.

    z: (N, L) start latents, actions: (H, N, A), task: (N,) or None, terminal_eps: (N, A) policy
    noise of the terminal action (drawn if None), heads: (2,) Q-head indices. Returns
    sum_t discount^t reward_t + discount^H * mean of the two heads' Q at the policy's terminal
    action: (N, 1)."""
    cfg = model.cfg
    ret, scale = 0.0, 1.0
    for t in range(actions.shape[0]):
        ret = ret + scale * tdmath.two_hot_inv(model.reward(z, actions[t], task), cfg.vmin, cfg.vmax)
        z = model.next(z, actions[t], task)
        scale *= discount
    action, _ = model.pi(z, task, eps=terminal_eps)
    logits = model.Q(z, action, task, return_type="all")
    return ret + scale * tdmath.two_hot_inv(logits[heads], cfg.vmin, cfg.vmax).mean(0)
