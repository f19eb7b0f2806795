"""Load TD-MPC2 world models from any known checkpoint layout, inferring every dimension.

Layouts:
- old (TD-MPC-Opt, published students, official MT30 checkpoints): `_Qs.params.N` and
  `_target_Qs.params.N`, N = 4 * layer + j (j: weight, bias, ln.weight, ln.bias);
- upstream (current nicklashansen/tdmpc2): `_Qs.params.<layer>.<name>`, `_detach_Qs_params.*`,
  `_target_Qs_params.*`, non-tensor metadata entries, `.module.*` meta tensors, buffers;
- quantized variants of either (fp16 / bf16 / qint8 tensors; dequantized to float32);
- ours: {"format": FORMAT, "config": ModelConfig dict, "model": state dict}, round-trips exactly.
Files are always read with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from agent.config import ModelConfig
from agent.errors import CheckpointError
from agent.tasksets import MT30, action_dims
from agent.world_model import WorldModel

FORMAT = "distill-sweeps/world-model"
FORMAT_VERSION = 1
_ENSEMBLE_NAMES = ("weight", "bias", "ln_weight", "ln_bias")
_OLD_Q = re.compile(r"^_(target_)?Qs\.params\.(\d+)$")
_NEW_Q = re.compile(r"^_(Qs\.params|target_Qs_params)\.(\d+)\.(weight|bias|ln\.weight|ln\.bias)$")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True; every failure becomes one CheckpointError line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    try:
        with warnings.catch_warnings():
            # warnings of torch's own loading code that the reader of a checkpoint cannot act on:
            # the weights-only unpickler warns about any pickle protocol it was not written for
            # (legacy-format files, and about 1 in 256 files of random bytes: the file loads or fails
            # below with one line, to which the warning would add a second), and rebuilding the
            # quantized tensors of an INT8 checkpoint (the published one) warns of deprecated APIs
            for message in ("Detected pickle protocol", "TypedStorage is deprecated", "torch.quantize_per_tensor"):
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint ({type(exc).__name__}: {reason[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


def _as_float(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        t = t.dequantize()
    return t.float() if t.is_floating_point() else t


def to_canonical_state_dict(raw: dict[str, Any], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map any official layout onto this project's key names (float32 tensors)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor) or ".module." in key or key.startswith("_detach_Qs"):
            continue  # metadata entries, meta-device module copies, gradient-free aliases
        if key in ("log_std_min", "log_std_dif"):
            out[key] = value
            continue
        value = _as_float(value)
        m = _OLD_Q.match(key)
        if m:
            index = int(m.group(2))
            prefix = "_target_Qs" if m.group(1) else "_Qs"
            out[f"{prefix}.layers.{index // 4}.{_ENSEMBLE_NAMES[index % 4]}"] = value
            continue
        m = _NEW_Q.match(key)
        if m:
            prefix = "_target_Qs" if m.group(1) == "target_Qs_params" else "_Qs"
            out[f"{prefix}.layers.{m.group(2)}.{m.group(3).replace('.', '_')}"] = value
            continue
        out[key] = value
    if not any(k.startswith("_encoder.") for k in out):
        raise CheckpointError(f"{where}: does not contain a TD-MPC2 world model (no encoder weights)")
    return out


def _need(sd: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        head = key.split(".")[0]
        raise CheckpointError(f"{where}: missing {key} (the {head} head is incomplete); not a TD-MPC2 world model")
    return sd[key]


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(indices) + 1 if indices else 0


def infer_config(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> ModelConfig:
    """Every dimension from tensor shapes of a canonical state dict."""
    emb = sd.get("_task_emb.weight")
    num_tasks, task_dim = (emb.shape[0], emb.shape[1]) if emb is not None else (1, 0)
    enc_layers = _count_layers(sd, "_encoder.state.")
    if enc_layers < 2:
        raise CheckpointError(f"{where}: missing _encoder.state layers; not a TD-MPC2 world model")
    enc0 = _need(sd, "_encoder.state.0.weight", where)
    latent_dim = _need(sd, f"_encoder.state.{enc_layers - 1}.weight", where).shape[0]
    dyn0 = _need(sd, "_dynamics.0.weight", where)
    mlp_dim = dyn0.shape[0]
    action_dim = dyn0.shape[1] - latent_dim - task_dim
    num_bins = _need(sd, "_reward.2.weight", where).shape[0]
    _need(sd, "_pi.2.weight", where)
    q_out = _need(sd, "_Qs.layers.2.weight", where)
    _need(sd, "_target_Qs.layers.2.weight", where)
    obs_dim = enc0.shape[1] - task_dim
    if action_dim <= 0 or obs_dim <= 0:
        raise CheckpointError(f"{where}: tensor shapes do not form a TD-MPC2 model (obs_dim {obs_dim}, action_dim {action_dim})")
    if num_tasks == len(MT30) and obs_dim == 24 and action_dim == 6:
        tasks, dims = list(MT30), action_dims(MT30)
    else:
        tasks = [f"task{i}" for i in range(num_tasks)]
        dims = [action_dim] * num_tasks
    if "_action_masks" in sd:
        dims = [int(row.sum().item()) for row in sd["_action_masks"]]
    log_std_min, log_std_max = -10.0, 2.0
    if "log_std_min" in sd and "log_std_dif" in sd:
        log_std_min = float(sd["log_std_min"])
        log_std_max = log_std_min + float(sd["log_std_dif"])
    try:
        return ModelConfig(obs_dim=obs_dim, action_dim=action_dim, tasks=tasks, task_action_dims=dims, task_dim=task_dim,
                           enc_dim=enc0.shape[0], mlp_dim=mlp_dim, latent_dim=latent_dim, num_enc_layers=enc_layers,
                           num_q=q_out.shape[0], num_bins=num_bins, log_std_min=log_std_min,
                           log_std_max=log_std_max).validate()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _load_into(model: WorldModel, sd: dict[str, torch.Tensor], where: str) -> WorldModel:
    sd = {k: v for k, v in sd.items() if k not in ("log_std_min", "log_std_dif")}
    if "_action_masks" not in sd:
        sd["_action_masks"] = model._action_masks
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensors, e.g. {missing[0]}; not a complete TD-MPC2 world model")
    for key, value in sd.items():
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {key}")
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict(sd, strict=True)
    return model


def load_world_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> WorldModel:
    """Load a world model from any supported layout; the model is returned in eval mode."""
    where = f"checkpoint {path}"
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        if obj.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{where}: written by a newer distill-sweeps (format version {obj.get('version')})")
        try:
            cfg = ModelConfig.from_dict(obj["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad model config ({exc})") from None
        sd = {k: _as_float(v) for k, v in dequantize_entries(obj["model"], obj.get("quant"), where).items()}
    else:
        raw = obj.get("model", obj)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: 'model' entry is not a state dict")
        sd = to_canonical_state_dict(raw, where)
        cfg = infer_config(sd, where)
    model = _load_into(WorldModel(cfg), sd, where)
    return model.to(device).eval()


# -- quantized files of our format (agent.quantize) -----------------------------------------------

def dequantize_entries(state_dict: dict[str, torch.Tensor], quant: dict[str, Any] | None,
                       where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our format's per-channel int8 entries -> float32: values (int8, (..., out, in)) times
    quant["scales"][key] ((..., out)). Other tensors are returned as stored (qint8 / fp16 / bf16 are
    handled by `_as_float`). A plain int8 tensor without a scale is an error, never loaded raw."""
    scales = (quant or {}).get("scales") or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in scales:
            out[key] = value.float() * scales[key].float().unsqueeze(-1)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.int8:
            raise CheckpointError(f"{where}: {key} is stored as int8 without a quantization scale")
        else:
            out[key] = value
    unknown = sorted(set(scales) - set(state_dict))
    if unknown:
        raise CheckpointError(f"{where}: quantization scales for unknown tensors, e.g. {unknown[0]}")
    return out


def checkpoint_payload(model: WorldModel, state_dict: dict[str, torch.Tensor] | None = None, **extra: Any) -> dict[str, Any]:
    """The dict our format stores; `state_dict` may be a converted (e.g. quantized) copy."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict(),
            "model": state_dict if state_dict is not None else model.state_dict(), **extra}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, then rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_world_model(model: WorldModel, path: str | os.PathLike, **extra: Any) -> Path:
    """Write `model` in this project's format (config + float state dict), atomically."""
    return atomic_torch_save(checkpoint_payload(model, **extra), path)
