"""Post-training quantization of world-model checkpoints (TD-MPC-Opt's recipes and a proper int8).

Modes (every file is in this project's format + a "quant" entry, and loads back through
`agent.checkpoint.load_world_model` into a float32 model that plans):

    fp32        every float tensor float32
    fp16 / bf16 every float tensor float16 / bfloat16
    int8_naive  every float tensor torch.qint8 per-tensor, scale 1.0, zero point 0: values are rounded
                to integers (~91% of the 1M student's weights become 0). TD-MPC-Opt's recipe, the
                paper's INT8 result.
    int8        2-D / 3-D weight matrices as int8 with one symmetric scale per output channel
                (per head and output row for the Q ensembles: scale = max|w| / 127), stored as plain
                int8 values + float32 scales (dequantized by the loader); biases, LayerNorm, task
                embedding and buffers kept as QuantConfig.int8_other_dtype.
    mixed       TD-MPC-Opt's mixed file: Q ensembles (online and target) qint8 naive, rest float16.

    python -m agent.quantize CKPT --mode MODE --out FILE
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import atomic_torch_save, checkpoint_payload, dequantize_entries, load_world_model
from agent.cli import OneLineParser
from agent.config import QUANT_MODES, QuantConfig
from agent.errors import ConfigError, DistillError
from agent.world_model import WorldModel

MIB = 1024 * 1024
_Q_PREFIXES = ("_Qs.", "_target_Qs.")
_NOT_MATRICES = ("_task_emb.weight", "_action_masks")  # 2-D, but an embedding table and a 0/1 buffer


@dataclass(frozen=True)
class QuantResult:
    path: Path
    size_mib: float
    mode: str


@dataclass
class QuantizedState:
    """A quantized state dict as stored, plus the file's "quant" entry (mode, per-channel scales)."""

    state_dict: dict[str, torch.Tensor]
    quant: dict[str, Any]

    def dequantized(self) -> dict[str, torch.Tensor]:
        """float32 tensors, as `load_world_model` reconstructs them."""
        return {k: (v.dequantize() if v.is_quantized else v.float() if v.is_floating_point() else v)
                for k, v in dequantize_entries(self.state_dict, self.quant).items()}


def naive_qint8(t: torch.Tensor) -> torch.Tensor:
    """TD-MPC-Opt's int8: quantize_per_tensor(scale=1.0, zero_point=0) -> nearest integer (ties to
    even) clamped to [-128, 127]."""
    with warnings.catch_warnings():  # quantized dtypes are deprecated upstream; this recipe needs them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(t.float(), scale=1.0, zero_point=0, dtype=torch.qint8)


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (..., out, in) -> (int8 values, float32 scales (..., out)).
    dequantized = values * scales[..., None]; all-zero rows get scale 1."""
    w = weight.float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values, scale


def _is_matrix(key: str, t: torch.Tensor) -> bool:
    """Linear / ensemble weight matrices (out, in) / (num_q, out, in); not LayerNorm, biases
    (the Q ensembles' are (num_q, out)), the task embedding or buffers."""
    is_weight = key.endswith(".weight") and not key.endswith(("ln.weight", "ln_weight"))
    return is_weight and t.dim() in (2, 3) and key not in _NOT_MATRICES


def quantize_state_dict(sd: dict[str, torch.Tensor], mode: str, cfg: QuantConfig | None = None) -> QuantizedState:
    """Quantize a canonical (this project's key names) float state dict; non-float tensors are kept."""
    cfg = QuantConfig(mode=mode, **({} if cfg is None else {"int8_other_dtype": cfg.int8_other_dtype})).validate()
    other = torch.float16 if cfg.int8_other_dtype == "float16" else torch.float32
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if value.is_quantized:
            value = value.dequantize()
        if not value.is_floating_point():
            out[key] = value
        elif mode == "fp32":
            out[key] = value.float()
        elif mode == "fp16":
            out[key] = value.half()
        elif mode == "bf16":
            out[key] = value.bfloat16()
        elif mode == "int8_naive":
            out[key] = naive_qint8(value)
        elif mode == "mixed":
            out[key] = naive_qint8(value) if key.startswith(_Q_PREFIXES) else value.half()
        elif _is_matrix(key, value):  # int8
            out[key], scales[key] = per_channel_int8(value)
        else:
            out[key] = value.to(other)
    quant: dict[str, Any] = {"mode": mode}
    if scales:
        quant["scales"] = scales
    return QuantizedState(out, quant)


def quantize_model(model: WorldModel, mode: str, cfg: QuantConfig | None = None) -> WorldModel:
    """A new float32 model holding `model`'s weights after a quantize -> dequantize round trip (eval mode)."""
    state = quantize_state_dict(model.state_dict(), mode, cfg)
    out = WorldModel(model.cfg)
    out.load_state_dict(state.dequantized())
    return out.to(next(model.parameters()).device).eval()


def quantize_file(ckpt: str | os.PathLike, mode: str, out: str | os.PathLike, cfg: QuantConfig | None = None) -> QuantResult:
    """Read any supported checkpoint, quantize it and write our format (+ "quant") atomically."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantize: unknown mode {mode!r}; known: {', '.join(QUANT_MODES)}")
    model = load_world_model(ckpt)
    state = quantize_state_dict(model.state_dict(), mode, cfg)
    path = atomic_torch_save(checkpoint_payload(model, state.state_dict, quant=state.quant), out)
    return QuantResult(path, path.stat().st_size / MIB, mode)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser("agent.quantize", description="Post-training quantization of a world-model checkpoint.")
    parser.add_argument("checkpoint", help="input checkpoint (any layout load_world_model reads)")
    parser.add_argument("--mode", required=True, help=f"one of {', '.join(QUANT_MODES)}")
    parser.add_argument("--out", required=True, help="output file (our format)")
    parser.add_argument("--int8-other-dtype", default=QuantConfig.int8_other_dtype, choices=("float32", "float16"),
                        help="dtype of the non-matrix tensors in int8 mode")
    args = parser.parse_args(argv)
    if args.mode not in QUANT_MODES:
        parser.error(f"unknown mode {args.mode!r}; choose from {', '.join(QUANT_MODES)}")
    try:
        result = quantize_file(args.checkpoint, args.mode, args.out, QuantConfig(args.mode, args.int8_other_dtype))
    except (DistillError, OSError) as exc:
        return parser.refuse(exc)
    print(f"{result.path}\t{result.size_mib:.3f} MiB\t{result.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
