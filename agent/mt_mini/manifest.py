"""MANIFEST.json / MANIFEST.md of an MT-mini build, assembled from the recipe's stage records."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.tasksets import MT30_ACTION_DIM, MT30_OBS_DIM

ACTION_REPEAT = 2  # agent.envs.ACTION_REPEAT (not imported: it pulls in dm_control); rewards <= 1 per control step

if TYPE_CHECKING:
    from agent.mt_mini.recipe import RecipeConfig
    from agent.mt_mini.stages import StageRecord

MANIFEST_FORMAT = "distill-sweeps/mt-mini-manifest"
MANIFEST_VERSION = 1


def _stage_summary(record: "StageRecord") -> dict[str, Any]:
    """Per stage: command, seed, steps, wall time and the headline results (no bulky arrays)."""
    s, r = record.settings, record.results
    summary: dict[str, Any] = {"name": record.name, "command": record.command, "seed": s["seed"],
                               "wall_s": round(record.wall_s, 1), "finished_utc": record.finished_utc,
                               "verify": f"python -m agent.mt_mini verify-step {record.name}"}
    if record.name.startswith("online:"):
        spec = s["spec"]
        summary.update(steps=spec["steps"], seed_steps=spec["seed_steps"], updates=r["updates"],
                       batch_size=spec["batch_size"], dims=spec["dims"], params=r["params"],
                       train_wall_s=round(r["train_wall_s"], 1),
                       episode_returns=[round(x, 1) for x in r["episode_returns"]],
                       score=r["score"], episode_scores=r["episode_scores"][spec["task"]])
    elif record.name == "pool":
        summary.update(episodes=r["episodes"], mean_return=r["mean_return"])
    elif record.name.startswith("teacher:"):
        t = s["teacher"]
        summary.update(steps=t["steps"], batch_size=t["batch_size"], dims=t["dims"], params=r["params"],
                       file=r["file"], sha256=r["sha256"], updates_per_s=round(r["updates_per_s"], 2))
    else:
        summary.update(score=r["score"], task_scores=r["task_scores"], episode_scores=r["episode_scores"],
                       params=r["params"], eval_wall_s=round(r["eval_wall_s"], 1))
    return summary


def build_manifest(cfg: "RecipeConfig", records: list["StageRecord"],
                   candidates: dict[str, float] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    by_name = {r.name: r for r in records}
    teachers = {}
    for t in cfg.teachers:
        trained, evaluated = by_name[f"teacher:{t.size}"].results, by_name[f"eval:teacher-{t.size}"].results
        teachers[t.size] = {"file": trained["file"], "sha256": trained["sha256"], "params": trained["params"],
                            "dims": t.dims, "steps": t.steps, "batch_size": t.batch_size,
                            "score": evaluated["score"], "task_scores": evaluated["task_scores"],
                            "episode_scores": evaluated["episode_scores"]}
    scratch = by_name["eval:untrained"].results
    return {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "benchmark": "mt-mini",
        "tasks": list(cfg.tasks), "obs_dim": MT30_OBS_DIM, "action_dim": MT30_ACTION_DIM,
        "episode_steps": cfg.episode_steps, "score_max": cfg.episode_steps * ACTION_REPEAT / 10,
        "planner": dict(cfg.planner),
        "evaluation": {"episodes": cfg.eval_episodes, "seed": cfg.eval_seed, "plan": True,
                       "protocol": "agent.evaluate.evaluate(model, tasks, episodes, seed, plan=True, "
                                   "agent_overrides=planner, max_steps=episode_steps); score = return / 10, "
                                   "mean over tasks of the mean over episodes"},
        "teachers": teachers,
        "baselines": {"untrained": {"dims": cfg.scratch_dims, "params": scratch["params"], "score": scratch["score"],
                                    "task_scores": scratch["task_scores"], "episode_scores": scratch["episode_scores"]}},
        "task_selection": {"single_task_scores": candidates or {}, "chosen": list(cfg.tasks),
                           "rule": "candidates whose single-task online run (same settings) scores at least 60% "
                                   "of the maximum"},
        "data": data or {},
        "recipe": cfg.to_dict(),
        "stages": [_stage_summary(r) for r in records],
        "total_wall_s": round(sum(r.wall_s for r in records), 1),
    }


def render_markdown(m: dict[str, Any]) -> str:
    lines = [
        "# MT-mini benchmark", "",
        f"Tasks: {', '.join(m['tasks'])}; episodes of {m['episode_steps']} agent steps (score = return / 10, "
        f"max {m['score_max']:g}); MPPI {m['planner']}; evaluation: {m['evaluation']['episodes']} episodes per task, "
        f"seed {m['evaluation']['seed']}.", "",
        "| model | params | dims | score | " + " | ".join(m["tasks"]) + " |",
        "|---|---|---|---|" + "---|" * len(m["tasks"]),
    ]
    rows = [(f"teacher-{size}", t) for size, t in m["teachers"].items()] + [("untrained student", m["baselines"]["untrained"])]
    for name, t in rows:
        dims = ", ".join(f"{k}={v}" for k, v in t["dims"].items())
        lines.append(f"| {name} | {t['params']:,} | {dims} | {t['score']:.1f} | "
                     + " | ".join(f"{t['task_scores'][task]:.1f}" for task in m["tasks"]) + " |")
    data = m.get("data") or {}
    if data:
        lines += ["", f"Distillation data (`{data['dir']}/`, the quick preset's store): {data['source']}; "
                  f"{data['episodes']} episodes, {data['transitions']:,} transitions, {data['bytes'] / 2**20:.1f} MiB, "
                  f"sha256 of the arrays {data['sha256'][:16]}…"]
    selection = m.get("task_selection", {}).get("single_task_scores", {})
    if selection:
        lines += ["", "Task selection: single-task online runs (same budget), MT-mini score of each run's own model:", "",
                  "| candidate | score | chosen |", "|---|---|---|"]
        lines += [f"| {task} | {score:.1f} | {'yes' if task in m['tasks'] else 'no'} |" for task, score in selection.items()]
    lines += ["", "## Stages", "", "| stage | seed | steps | wall (s) | result |", "|---|---|---|---|---|"]
    for s in m["stages"]:
        result = f"score {s['score']:.1f}" if "score" in s else (f"{s['params']:,} params" if "params" in s else
                                                                  f"{s.get('episodes', '')} episodes")
        wall = s.get("train_wall_s", s["wall_s"])  # online runs: cumulative over resumed invocations
        lines.append(f"| {s['name']} | {s['seed']} | {s.get('steps', '')} | {wall:.0f} | {result} |")
    lines += ["", "Wall times: online runs count every invocation (they resume at episode ends); other stages count "
              "the invocation that finished them.", "",
              "Commands (each stage records the invocation that ran it; re-running `build` skips finished stages):", ""]
    for command in dict.fromkeys(s["command"] for s in m["stages"]):
        lines.append(f"    {command}")
    lines += ["", "Check one step against these figures: `python -m agent.mt_mini verify-step STAGE`.", ""]
    return "\n".join(lines)


def write_manifest(cfg: "RecipeConfig", records: list["StageRecord"], out: Path,
                   candidates: dict[str, float] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = build_manifest(cfg, records, candidates, data)
    for name, text in (("MANIFEST.json", json.dumps(manifest, indent=1) + "\n"), ("MANIFEST.md", render_markdown(manifest))):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(out / name)
    return manifest
