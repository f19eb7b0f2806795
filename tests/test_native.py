"""Fused native CPU kernels (agent/native): each equals the torch ops it replaces, forward and
backward, including widths that are not a multiple of the vector width and extreme inputs; the
planner gives the same actions with or without them, on one worker thread or several."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import small_model

from agent import Agent, native
from agent import math as tdmath
from agent.layers import simnorm
from agent.planner import row_chunks

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels cannot be built here (no C compiler?)")


def _reference(x, gamma, beta, add=None, act=True):
    if add is not None:
        x = (x.view(add.shape[0], -1, x.shape[-1]) + add.unsqueeze(1)).view(x.shape)
    y = F.layer_norm(x, (x.shape[-1],), gamma, beta)
    return F.mish(y) if act else y


@needs_native
@pytest.mark.parametrize("width", [384, 37, 16, 5])
def test_ln_act_matches_torch(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(24, width, generator=g) * 4 + 1
    gamma, beta = torch.randn(width, generator=g), torch.randn(width, generator=g)
    add = torch.randn(3, width, generator=g)
    torch.testing.assert_close(native.ln_act(x, gamma, beta), _reference(x, gamma, beta), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(native.ln_act(x, gamma, beta, add=add), _reference(x, gamma, beta, add), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(native.ln_act(x, gamma, beta, act=native.NO_ACT), _reference(x, gamma, beta, act=False),
                               rtol=1e-5, atol=2e-6)
    inplace = x.clone()
    assert native.ln_act(inplace, gamma, beta, out=inplace).data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, _reference(x, gamma, beta), rtol=1e-5, atol=2e-6)


@needs_native
def test_ln_act_extreme_inputs_stay_exact():
    """Mish saturates to y for large y and to ~0 for very negative y; the fused exp must neither
    overflow nor produce NaN there."""
    x = torch.tensor([[-1e4, -90.0, -20.0, 0.0, 20.0, 50.0, 90.0, 1e4]])
    gamma, beta = torch.full((8,), 30.0), torch.zeros(8)
    out = native.ln_act(x, gamma, beta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(x, gamma, beta), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("width", [384, 37])
def test_layer_norm_act_gradients_match_torch(width):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 9, width, generator=g) * 3
    gamma0, beta0 = torch.randn(width, generator=g), torch.randn(width, generator=g)
    grad_out = torch.randn(2, 9, width, generator=g)
    grads = []
    for fn in (lambda x, ga, be: native.layer_norm_act(x, ga, be), lambda x, ga, be: F.mish(F.layer_norm(x, (width,), ga, be))):
        x, gamma, beta = (t.clone().requires_grad_() for t in (x0, gamma0, beta0))
        out = fn(x, gamma, beta)
        out.backward(grad_out)
        grads.append((out.detach(), x.grad, gamma.grad, beta.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def _heads_reference(x, gamma, beta, scale, transpose_heads):
    """Per-head Mish(LayerNorm(scale * x) * gamma[h] + beta[h]) -> (heads, N, D)."""
    x = (x * scale).transpose(0, 1) if transpose_heads else x * scale
    return F.mish(F.layer_norm(x, (x.shape[-1],)) * gamma.unsqueeze(1) + beta.unsqueeze(1))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("transpose_heads", [False, True])
def test_ensemble_layer_norm_act_matches_torch(monkeypatch, threads, transpose_heads):
    """Per-head affine, dropout scale and the (N, heads, D) -> (heads, N, D) transpose of the Q
    ensemble, forward and backward, on one thread and split over two (per-thread affine sums)."""
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        heads, rows, width = 3, 41, 37
        shape = (rows, heads, width) if transpose_heads else (heads, rows, width)
        x0 = torch.randn(*shape, generator=g) * 2
        gamma0, beta0 = torch.randn(heads, width, generator=g), torch.randn(heads, width, generator=g)
        grad_out = torch.randn(heads, rows, width, generator=g)
        results = []
        for fn in (lambda x, ga, be: native.layer_norm_act(x, ga, be, 1e-5, native.MISH, 1.25, transpose_heads),
                   lambda x, ga, be: _heads_reference(x, ga, be, 1.25, transpose_heads)):
            x, gamma, beta = (t.clone().requires_grad_() for t in (x0, gamma0, beta0))
            out = fn(x, gamma, beta)
            out.backward(grad_out)
            results.append((out.detach(), x.grad, gamma.grad, beta.grad))
    finally:
        torch.set_num_threads(previous)
    assert results[0][0].shape == (heads, rows, width)
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@needs_native
def test_q_ensemble_with_dropout_equals_torch_path():
    """Train mode (dropout on): the fused path gives the torch path's Q logits and gradients for
    the same random stream (same drop mask)."""
    from agent.train_kernels import BatchKernels, use_native_kernels

    model = small_model(0, num_q=3).train()
    g = torch.Generator().manual_seed(4)
    task = torch.randint(0, len(model.cfg.tasks), (16,), generator=g)
    z = torch.randn(2, 16, model.cfg.latent_dim, generator=g)
    a = torch.rand(2, 16, model.cfg.action_dim, generator=g) * 2 - 1
    results = []
    for enabled in (True, False):
        assert use_native_kernels(enabled) == enabled
        model.zero_grad()
        torch.manual_seed(5)
        logits = BatchKernels(model, task).q_all(z, a)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model._Qs.parameters()]))
    use_native_kernels(True)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for ours, ref in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@needs_native
def test_two_hot_decode_matches_two_hot_inv_with_padding():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 101, generator=g) * 5
    expected = tdmath.two_hot_inv(logits, -10.0, 10.0)
    torch.testing.assert_close(native.two_hot_decode(logits, -10.0, 10.0), expected, rtol=2e-5, atol=1e-5)
    padded = torch.cat([logits, torch.full((50, 11), 1e3)], 1)  # padding columns must be ignored
    torch.testing.assert_close(native.two_hot_decode(padded, -10.0, 10.0, bins=101), expected, rtol=2e-5, atol=1e-5)
    with pytest.raises(ValueError):
        native.two_hot_decode(logits, -10.0, 10.0, bins=102)


@needs_native
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_ln_simnorm_matches_torch(scale):
    """scale 40: groups whose logits differ by far more than exp's range still normalise."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 128, generator=g)
    gamma, beta = torch.randn(128, generator=g) * scale, torch.randn(128, generator=g)
    expected = simnorm(F.layer_norm(x, (128,), gamma, beta), 8)
    out = native.ln_simnorm_(x.clone(), gamma, beta, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.view(30, 16, 8).sum(-1), torch.ones(30, 16))


def test_row_chunks_cover_every_row_once():
    for num_envs, rows_per_env, chunk in [(16, 512, 2048), (1, 512, 256), (3, 7, 5), (5, 100, 1000), (2, 9, 4)]:
        covered = torch.zeros(num_envs * rows_per_env, dtype=torch.long)
        for rows, envs in row_chunks(num_envs, rows_per_env, chunk):
            covered[rows] += 1
            assert rows.start // rows_per_env == envs.start and -(-rows.stop // rows_per_env) == envs.stop
            assert rows.stop - rows.start <= max(chunk, rows_per_env)
        assert (covered == 1).all()


def _plan(model, workers, chunk_rows, steps=3):
    agent = Agent(model, seed=5, iterations=3, num_samples=96, num_elites=8, num_pi_trajs=6)
    agent.workers, agent.chunk_rows = workers, chunk_rows
    obs = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
    task = torch.tensor([0, 7, 16, 4])
    return torch.stack([agent.act(obs, task, t0=step == 0) for step in range(steps)])


@needs_native
@pytest.mark.parametrize("value_kernel", [True, False])
def test_threaded_planning_equals_single_worker(monkeypatch, value_kernel):
    """Plans do not depend on the thread count, in the one-call native value estimate (OpenMP
    threads) and in the torch chunk path it falls back to (Python worker threads)."""
    if not value_kernel:
        from agent.rollout import PlanningKernels
        monkeypatch.setattr(PlanningKernels, "value_net", lambda *args: None)
    model = small_model(0, noise=0.3).eval()
    single = _plan(model, workers=1, chunk_rows=4096)
    torch.testing.assert_close(_plan(model, workers=2, chunk_rows=50), single, rtol=0, atol=1e-5)
    torch.testing.assert_close(_plan(model, workers=3, chunk_rows=4096), single, rtol=0, atol=1e-5)


@needs_native
@pytest.mark.parametrize("threads,block,multitask", [(1, 128, True), (2, 7, True), (3, 1000, True), (2, 16, False)])
def test_native_value_estimate_equals_torch_chunks(monkeypatch, threads, block, multitask):
    """native.ValueNet (horizon steps + policy action + mean of two Q heads in one call) gives the
    torch chunk path's values for several tasks (or a single-task model), whatever the thread
    count and the block size (blocks that cut across environments included)."""
    if not native.value_kernel_available():
        pytest.skip("torch exports no BLAS entry points here")
    from agent.rollout import PlanningKernels

    model = small_model(0, noise=0.3, **({} if multitask else dict(tasks=["cartpole-balance"], task_dim=0))).eval()
    task, samples, horizon = (torch.tensor([3, 0, 16]) if multitask else None), 40, 3
    agent = Agent(model, seed=0, num_samples=samples, num_elites=8, num_pi_trajs=6, horizon=horizon)
    g = torch.Generator().manual_seed(6)
    nets = PlanningKernels(model, task, 3)
    z = nets.encode(torch.randn(3, 24, generator=g), task).repeat_interleave(samples, 0)
    mask = model.action_mask(task).repeat_interleave(samples, 0) if multitask else torch.ones(3 * samples, 6)
    actions = (torch.rand(horizon, 3 * samples, 6, generator=g) * 2 - 1) * mask
    eps = torch.randn(3 * samples, 6, generator=g)
    heads = torch.tensor([2, 0])
    value_net = nets.value_net(heads, samples, horizon, agent.discount)
    with torch.inference_mode():
        ours = value_net(z, actions, mask, eps, block=block, threads=threads)
        monkeypatch.setattr(PlanningKernels, "value_net", lambda *args: None)
        monkeypatch.setattr(Agent, "_q_heads", lambda self, device: heads)
        expected = agent._estimate_value(nets, z, actions, mask, eps)
    assert ours.shape == (3 * samples, 1)
    assert expected.std() > 0.1  # values that differ between samples, not a constant
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        value_net(z[:-1], actions, mask, eps)


def test_planning_without_native_kernels_matches(tmp_path):
    """DISTILL_NATIVE=0 (or no compiler) falls back to torch ops with the same plans."""
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); from helpers import small_model; from agent import native;"
        "from test_native import _plan; torch.save((native.available(), _plan(small_model(0, noise=0.3).eval(), 1, 4096)),"
        f"r'{tmp_path / 'plan.pt'}')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DISTILL_NATIVE": "0"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, env=env)
    available, plans = torch.load(tmp_path / "plan.pt", weights_only=True)
    assert available is False
    if native.available():
        torch.testing.assert_close(plans, _plan(small_model(0, noise=0.3).eval(), 1, 4096), rtol=0, atol=1e-4)


def test_broken_compiler_falls_back_with_one_warning(tmp_path):
    script = "import warnings; from agent import native; print(native.available())"
    env = {**os.environ, "CC": "false", "DISTILL_NATIVE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "False"
    assert done.stderr.count("UserWarning: native CPU kernels unavailable") == 1


@needs_native
def test_signatures_and_struct_layouts_are_checked_against_the_library(monkeypatch):
    """bindings.py's ctypes table and struct mirrors agree with kernels.c (checked at load); a
    mismatch in either raises NativeABIError instead of calling with wrong types or offsets."""
    import ctypes

    from agent.native import bindings

    lib = native._library()
    bindings.check_signatures(lib.cdll)
    bindings.check_layouts(lambda name: lib.native_layout(name=name))
    assert lib.native_layout(name=b"value_net_t") == ctypes.sizeof(bindings.ValueNetStruct)
    assert lib.native_layout(name=b"layer_t.no_such_field") == -1

    result, arguments = bindings.FUNCTIONS["two_hot_decode"]
    monkeypatch.setitem(bindings.FUNCTIONS, "two_hot_decode", (result, arguments[:-1] + [("vmax", "d")]))
    with pytest.raises(bindings.NativeABIError, match="two_hot_decode"):
        bindings.check_signatures(lib.cdll)
    monkeypatch.undo()

    class Shifted(ctypes.Structure):  # a mirror with one field too many before `in`
        _c_name = "layer_t"
        _fields_ = [(n, t) for n, t in bindings.Layer._fields_[:4]] + [("extra", ctypes.c_int64)] + \
            [(n, t) for n, t in bindings.Layer._fields_[4:]]

    monkeypatch.setattr(bindings, "STRUCTS", (Shifted,))
    with pytest.raises(bindings.NativeABIError, match="layer_t"):
        bindings.check_layouts(lambda name: lib.native_layout(name=name))


@needs_native
def test_library_functions_take_every_argument_by_name():
    lib = native._library()
    logits = torch.randn(3, 5)
    out = torch.empty(3, 1)
    with pytest.raises(TypeError, match="missing"):
        lib.two_hot_decode(logits=logits.data_ptr(), stride=5, out=out.data_ptr(), rows=3, bins=5, vmin=-1.0)
    with pytest.raises(TypeError, match="unexpected"):
        lib.two_hot_decode(logits=logits.data_ptr(), stride=5, out=out.data_ptr(), rows=3, bins=5, vmin=-1.0,
                           vmax=1.0, extra=0)
