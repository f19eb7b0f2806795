"""MPPI's value estimate in one native call (`plan_values` in kernels.c): horizon dynamics/reward
steps, the policy prior's terminal action and the mean of two Q heads (of any depth), for every
sampled row; GEMMs through torch's own BLAS."""
from __future__ import annotations

import ctypes
import functools

import torch

from agent import native
from agent.native.bindings import Layer, ValueNetStruct
from agent.native.blas import torch_blas
from agent.native.ops import _check, _ptr


@functools.lru_cache(maxsize=1)
def value_kernel_unavailable() -> str | None:
    """Why `ValueNet` cannot run here (one line), or None when it can: the fused kernels plus
    torch's BLAS entry points, checked on a small product."""
    if not native.available():
        return "the native kernels are unavailable"
    blas = torch_blas()
    if blas is None:
        return "torch's library exports no sgemm_"
    if native._library().gemm_selftest(sgemm=blas[0]) != 1:
        return "torch's sgemm_ failed the native GEMM self-test"
    return None


def value_kernel_available() -> bool:
    """Whether `ValueNet` can run here (see `value_kernel_unavailable`)."""
    return value_kernel_unavailable() is None


class Dense:
    """One layer for `ValueNet`: w (in, out) (the weight transposed), bias (out,) or per environment
    (E, out), LayerNorm gamma / beta (out,) for hidden layers. Tensors are made contiguous float32."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None):
        self.w, self.bias = w.contiguous(), bias.contiguous()
        self.gamma = None if gamma is None else gamma.contiguous()
        self.beta = None if beta is None else beta.contiguous()
        _check(self.w, self.bias, self.gamma, self.beta)

    def struct(self) -> Layer:
        return Layer(_ptr(self.w), _ptr(self.bias), _ptr(self.gamma), _ptr(self.beta), self.w.shape[0], self.w.shape[1],
                     int(self.bias.dim() == 2))


class ValueNet:
    """The planner's value estimate (PlanningKernels.step x horizon, pi, mean of two Q heads) as one
    native call over all rows. `layers`: Dense for first (reward | dynamics first layers side by
    side, per-env bias), reward1, reward_out, next1, next_out, pi0 (per-env bias), pi1, pi_out, and
    q: two lists (one per Q head) of that head's layers, hidden ones (the first with a per-env bias)
    then the output layer. Keeps the tensors alive."""

    def __init__(self, layers: dict, *, latent: int, action: int, mlp: int, bins: int, simnorm: int,
                 rows_per_env: int, horizon: int, discount: float, vmin: float, vmax: float, log_std_min: float,
                 log_std_max: float, ln_eps: float = 1e-5):
        sgemm, local = torch_blas()
        self.layers = layers
        net = ValueNetStruct(sgemm=sgemm, set_threads_local=local)
        heads = layers["q"]
        if len(heads) != 2 or len({len(h) for h in heads}) != 1 or not heads[0]:
            raise ValueError("ValueNet: q takes two heads with the same, non-zero number of layers")
        self._q_arrays = [(Layer * len(head))(*[layer.struct() for layer in head]) for head in heads]
        for h, array in enumerate(self._q_arrays):
            net.q[h] = ctypes.cast(array, ctypes.POINTER(Layer))
        net.q_layers = len(heads[0])
        for name, layer in layers.items():
            if name != "q":
                setattr(net, name, layer.struct())
        for name, value in dict(latent=latent, action=action, mlp=mlp, bins=bins, simnorm=simnorm,
                                rows_per_env=rows_per_env, horizon=horizon, discount=discount, vmin=vmin, vmax=vmax,
                                log_std_min=log_std_min, log_std_max=log_std_max, ln_eps=ln_eps).items():
            setattr(net, name, value)
        self.net = net

    def __call__(self, z: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor,
                 block: int = 128, threads: int | None = None) -> torch.Tensor:
        """z (N, latent), actions (horizon, N, action), mask / eps (N, action) -> values (N, 1)."""
        rows = z.shape[0]
        _check(z, actions, mask, eps)
        if actions.shape != (self.net.horizon, rows, self.net.action) or z.shape[1] != self.net.latent:
            raise ValueError(f"ValueNet: z {tuple(z.shape)} / actions {tuple(actions.shape)} do not match the net")
        threads = max(1, torch.get_num_threads() if threads is None else threads)
        block = max(1, min(block, -(-rows // threads)))
        out = torch.empty(rows, 1)
        if native._library().plan_values(net=ctypes.addressof(self.net), z=_ptr(z), actions=_ptr(actions),
                                         mask=_ptr(mask), eps=_ptr(eps), out=_ptr(out), rows=rows, block=block,
                                         threads=threads) != 0:
            raise MemoryError("native plan_values: could not allocate scratch memory")
        return out
