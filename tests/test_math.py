"""two-hot / symlog / soft cross-entropy against the authors' reference values."""
import numpy as np
import torch

from agent import math as tdmath


def test_two_hot_matches_reference(fixtures_dir):
    ref = np.load(fixtures_dir / "twohot.npz")
    x = torch.tensor(ref["x"])
    np.testing.assert_allclose(tdmath.symlog(x).numpy(), ref["symlog_x"], rtol=1e-6, atol=1e-6)
    # bin positions are ~25 in float32, so one ulp of the position moves a weight by ~2e-6
    np.testing.assert_allclose(tdmath.two_hot(x.unsqueeze(-1)).numpy(), ref["two_hot_x"], atol=5e-6)
    np.testing.assert_allclose(tdmath.symexp(tdmath.symlog(x)).numpy(), ref["symexp_symlog_x"], rtol=1e-6)
    x_out = torch.tensor(ref["x_out"]).unsqueeze(-1)
    np.testing.assert_allclose(tdmath.two_hot(x_out).numpy(), ref["two_hot_x_out"], atol=1e-6)
    np.testing.assert_allclose(tdmath.symexp(torch.tensor(ref["y_small"])).numpy(), ref["symexp_y_small"], rtol=1e-6)
    logits = torch.tensor(ref["pred_logits"])
    np.testing.assert_allclose(tdmath.two_hot_inv(logits).numpy(), ref["two_hot_inv_pred"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(tdmath.soft_ce(logits, x.unsqueeze(-1)).numpy(), ref["soft_ce_pred_x"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tdmath.bins().numpy(), ref["dreg_bins"], atol=1e-6)


def test_two_hot_is_a_distribution_that_decodes_back():
    x = torch.tensor([[-300.0], [-1.5], [0.0], [0.3], [42.0]])
    dist = tdmath.two_hot(x)
    assert torch.allclose(dist.sum(-1), torch.ones(5))
    assert (dist > 0).sum(-1).max() <= 2
    decoded = tdmath.symexp((dist * tdmath.bins()).sum(-1))
    assert torch.allclose(decoded, x.squeeze(-1), rtol=1e-4, atol=1e-5)
