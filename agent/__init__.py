"""TD-MPC2 world models, batched MPPI planning, distillation training and quantization (no Ray here)."""
from agent.config import ModelConfig, PlannerConfig, model_config
from agent.planner import Agent
from agent.world_model import WorldModel

__all__ = ["Agent", "ModelConfig", "PlannerConfig", "WorldModel", "model_config"]
