"""Matmul FLOP counts of the world model's heads and of one MPPI planning call (2 * in * out per
Linear per row; element-wise work is not counted). Counts use the heads as defined, i.e. the full
first layer including the task-embedding columns, whatever shortcuts the planner takes."""
from __future__ import annotations

from agent.config import ModelConfig, PlannerConfig


def _mlp_flops(dims: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def head_flops(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per row of each head."""
    td, ld, ad, h = cfg.task_dim, cfg.latent_dim, cfg.action_dim, cfg.mlp_dim
    enc_hidden = max(cfg.num_enc_layers - 1, 1) * [cfg.enc_dim]
    return {
        "encode": _mlp_flops([cfg.obs_dim + td, *enc_hidden, ld]),
        "next": _mlp_flops([ld + ad + td, h, h, ld]),
        "reward": _mlp_flops([ld + ad + td, h, h, cfg.num_bins]),
        "pi": _mlp_flops([ld + td, h, h, 2 * ad]),
        "q_head": _mlp_flops([ld + ad + td, h, h, cfg.num_bins]),
    }


def planning_flops(model_cfg: ModelConfig, plan_cfg: PlannerConfig, num_envs: int = 1) -> int:
    """FLOPs of one `Agent.act` planning call for `num_envs` environments."""
    f = head_flops(model_cfg)
    horizon, samples, pi_trajs = plan_cfg.horizon, plan_cfg.num_samples, plan_cfg.num_pi_trajs
    per_env = f["encode"]
    per_env += pi_trajs * (horizon * f["pi"] + (horizon - 1) * f["next"])
    value = horizon * (f["reward"] + f["next"]) + f["pi"] + 2 * f["q_head"]
    per_env += plan_cfg.iterations * samples * value
    return num_envs * per_env
