"""Quantization table for the published 1M student (TD-MPC-Opt, MT30).

For every mode of `agent.quantize`: the file size in MiB and the max abs error of the decoded
reward and Q predictions against the fp32 model (the published fp16 weights upcast), on the
inputs of the `wm_fp16.npz` fixture. Prints a markdown table, then one JSON line (last line).

    python benchmarks/quant_table.py [--fixtures DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import fixtures_path

from agent.checkpoint import load_world_model
from agent.config import QUANT_MODES
from agent.math import two_hot_inv
from agent.quantize import quantize_file

STUDENT = "published/mt30_1M_steps_045dist_fp16.pt"
PUBLISHED = {"fp16": "mt30_1M_steps_045dist_fp16.pt", "int8_naive": "mt30_1M_steps_045dist_int8.pt",
             "mixed": "mt30_1M_steps_045dist_mixed.pt"}


@torch.no_grad()
def predictions(model, obs: torch.Tensor, action: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded reward (B, 1) and every online Q head's decoded value (num_q, B, 1)."""
    z = model.encode(obs, task)
    reward = two_hot_inv(model.reward(z, action, task), model.cfg.vmin, model.cfg.vmax)
    q = two_hot_inv(model.Q(z, action, task, return_type="all"), model.cfg.vmin, model.cfg.vmax)
    return reward, q


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=fixtures_path())
    args = parser.parse_args(argv)
    student = args.fixtures / STUDENT
    if not student.is_file():
        print(f"quant_table: published student not found at {student} (pass --fixtures)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)  # torch's deprecation notes on quantized storages
    torch.set_num_threads(1)
    data = np.load(args.fixtures / "wm_fp16.npz")
    obs, action, task = (torch.from_numpy(data[k]) for k in ("in_obs", "in_action", "in_task"))

    reference = load_world_model(student)
    ref_reward, ref_q = predictions(reference, obs, action, task)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in QUANT_MODES:
            result = quantize_file(student, mode, Path(tmp) / f"{mode}.pt")
            model = load_world_model(result.path)
            reward, q = predictions(model, obs, action, task)
            published = PUBLISHED.get(mode)
            rows.append({
                "mode": mode,
                "size_mib": round(result.size_mib, 3),
                "published_size_mib": round((args.fixtures / "published" / published).stat().st_size / 2**20, 3)
                if published else None,
                "reward_max_abs_err": float((reward - ref_reward).abs().max()),
                "reward_median_abs_err": float((reward - ref_reward).abs().median()),
                "q_max_abs_err": float((q - ref_q).abs().max()),
                "q_median_abs_err": float((q - ref_q).abs().median()),
            })
    print("| mode | file MiB | published file MiB | reward err max | reward err median | Q err max | Q err median |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pub = f"{r['published_size_mib']:.3f}" if r["published_size_mib"] is not None else "-"
        print(f"| {r['mode']} | {r['size_mib']:.3f} | {pub} | {r['reward_max_abs_err']:.3g} | {r['reward_median_abs_err']:.3g} "
              f"| {r['q_max_abs_err']:.3g} | {r['q_median_abs_err']:.3g} |")
    print(f"\nAbsolute errors of decoded predictions vs the fp32 model ({STUDENT} upcast; fp16 is therefore exact) on the "
          f"wm_fp16.npz inputs (B={obs.shape[0]}, random obs: |reward| up to {float(ref_reward.abs().max()):.0f}, "
          f"|Q| up to {float(ref_q.abs().max()):.0f}); Q = every online head.")
    print(json.dumps({"benchmark": "quant_table", "student": STUDENT, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
