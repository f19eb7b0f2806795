"""MT-mini: the embedded default benchmark (a few fast-learning MT30 tasks, two shipped teachers).

Library (what the sweep service calls):

    mt_mini_tasks()                  -> ['cartpole-balance', ...]   (the manifest's task order = task ids)
    teacher_path('small' | 'large')  -> Path of a shipped teacher checkpoint (our format)
    ensure_dataset(cache_dir=None)   -> Path of the distillation store: the pooled replay of the
                                        online learners, shipped in the assets and copied on first
                                        use under ~/.cache/distill-sweeps/mt-mini/ (or $DISTILL_CACHE)
    manifest()                       -> the shipped MANIFEST.json as a dict
    student_config(**dims)           -> ModelConfig of an MT-mini student (MT30 padding 24 / 6)
    evaluate_mt_mini(model)          -> DataFrame task/episode/return/score with the MT-mini protocol
    QUICK_DEFAULTS                   -> settings of the quick preset (student dims, steps, ...)

CLI:

    python -m agent.mt_mini build [--out DIR] [--work DIR] [--seed S] [--jobs N] ...
    python -m agent.mt_mini verify-step STAGE [--dir DIR]
    python -m agent.mt_mini dataset --out DIR [--episodes-per-task N]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.mt_mini.dataset import DatasetSpec, cached_store_copy, collect_dataset, default_cache_root
from agent.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets" / "mt_mini"
TEACHER_SIZES = ("small", "large")

# The quick preset: the d_coef grid (sweeps.grids.QUICK_D_COEFS) x 5 seeds, each trial one
# population of 5 students, the 3 trials at once on 2 cores. Settings fixed on scratch students
# only (d_coef 0: learning rate, size, batch, updates), before any d_coef was compared; the grid
# lost its fourth value (0.1) for time after one run of all four (README). The README states the
# measured wall time of the whole command.
QUICK_DEFAULTS: dict[str, Any] = {
    # keys named as `sweeps.config.TrialConfig` fields (the quick preset copies the ones it knows)
    # ~67k params: a 23k student (32/32/16/8) stayed within 1-2 points of the untrained one (lr 3e-4
    # up to 8000 updates, lr 1e-3 / 3e-3 up to 3000); this one about doubles it in 3000 at lr 3e-3
    "student_dims": dict(enc_dim=64, mlp_dim=64, latent_dim=32, task_dim=16, num_q=2),
    "num_seeds": 5,
    "steps": 3000,
    "batch_size": 256,
    "lr": 3e-3,
    # 4 points per learning curve: the untrained students (step 0; what "the students learn" is
    # read against), 1000, 2000 and 3000 updates. With 3 trials on 2 cores, one evaluation of a
    # trial's 5 students took ~60 s at 2 episodes per task and ~140 s at 6, and the whole command
    # 1202 s with 2 episodes at 0, 1000 and 2000: 1 episode there keeps it within 20 minutes.
    # The report compares the 6-episode evaluations at 3000; the curve describes. Evaluations do not
    # move training's random stream, so the scores at 3000 depend on neither setting.
    "eval_every": 1000,
    "eval_at_start": True,
    "eval_episodes": 1,          # per task at 0, 1000, 2000 (the curve's points)
    "final_eval_episodes": 6,    # per task at 3000: the score the report compares (SE ~1.5-2 per student)
    "eval_max_steps": 200,       # MT-mini episodes (the manifest's episode_steps)
    "eval_planner": {"num_samples": 128, "iterations": 3},  # the manifest's planner
    "quant_modes": ["fp32"],     # each extra mode costs one more evaluation per student
    "teacher_size": "large",
    # no "train.compile": the population update runs eagerly on CPU (compile "auto"), with the
    # native member kernel. Measured on an AVX2 host, 1 thread, 5 students: 127 ms per update
    # eager, 166 ms compiled by inductor, plus 1-3 minutes of compiling per trial on first use
    # (README); `--set train.compile=on` compiles it.
    # not a trial setting: torch threads per trial process
    "torch_threads": 1,
}


class MiniBenchmarkError(ConfigError):
    """The shipped MT-mini assets are missing or inconsistent."""


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MiniBenchmarkError(f"MT-mini manifest {path} not found; build it with "
                                 "`python -m agent.mt_mini build --out DIR`")
    return json.loads(path.read_text())


def manifest(directory: Path | None = None) -> dict[str, Any]:
    """The MANIFEST.json of the shipped assets (or of a build in `directory`)."""
    return _read_manifest(Path(directory or ASSETS).resolve() / "MANIFEST.json")


def mt_mini_tasks(directory: Path | None = None) -> list[str]:
    """The MT-mini task names; their order is the models' task ids."""
    return list(manifest(directory)["tasks"])


def teacher_path(size: str, directory: Path | None = None) -> Path:
    """The checkpoint of the 'small' or 'large' teacher."""
    if size not in TEACHER_SIZES:
        raise MiniBenchmarkError(f"teacher size must be one of {TEACHER_SIZES}, got {size!r}")
    directory = Path(directory or ASSETS).resolve()
    path = directory / manifest(directory)["teachers"][size]["file"]
    if not path.is_file():
        raise MiniBenchmarkError(f"MT-mini {size} teacher {path} is missing (the manifest names it)")
    return path


def student_config(directory: Path | None = None, **dims: int):
    """ModelConfig of a multi-task MT-mini model; `dims` default to QUICK_DEFAULTS['student_dims']."""
    from agent.mt_mini.recipe import multitask_config

    return multitask_config(mt_mini_tasks(directory), {**QUICK_DEFAULTS["student_dims"], **dims})


def dataset_spec(episodes_per_task: int, directory: Path | None = None, seed: int = 1) -> DatasetSpec:
    """Settings of a large-teacher rollout store (the `dataset` command; not the quick preset's data)."""
    m = manifest(directory)
    return DatasetSpec(teacher_sha256=m["teachers"]["large"]["sha256"], tasks=tuple(m["tasks"]),
                       episodes_per_task=episodes_per_task, episode_steps=m["episode_steps"],
                       planner=tuple(sorted(m["planner"].items())), seed=seed)


def ensure_dataset(cache_dir: Path | None = None, progress: bool = True, directory: Path | None = None) -> Path:
    """The MT-mini distillation store: the pooled replay of the online learners shipped with the
    assets (MANIFEST `data`), copied on first use into `cache_dir` (default `$DISTILL_CACHE/mt-mini`
    or `~/.cache/distill-sweeps/mt-mini`) and checked against its checksum."""
    directory = Path(directory or ASSETS).resolve()
    data = manifest(directory).get("data")
    if not data:
        raise MiniBenchmarkError(f"MT-mini manifest in {directory} names no distillation data; rebuild with "
                                 "`python -m agent.mt_mini build`")
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return cached_store_copy(directory / data["dir"], data["sha256"], root, progress)


def evaluate_mt_mini(model, episodes: int | None = None, seed: int | None = None, progress: bool = False,
                     directory: Path | None = None):
    """Evaluate `model` on the MT-mini tasks with the manifest's protocol (MPPI settings, episode
    length, seed); `episodes` defaults to the manifest's. Returns evaluate()'s DataFrame."""
    from agent.evaluate import evaluate

    import torch

    m = manifest(directory)
    ev = m["evaluation"]
    seed = ev["seed"] if seed is None else seed
    torch.manual_seed(seed)  # the planner draws its Q-head pair (num_q > 2) from the global generator
    return evaluate(model, m["tasks"], episodes or ev["episodes"], seed, plan=True,
                    agent_overrides=dict(m["planner"]), progress=progress, max_steps=m["episode_steps"])


# -- verification -------------------------------------------------------------------------------

def verify_step(stage: str, directory: Path | None = None, work: Path | None = None, log=print) -> dict[str, Any]:
    """Re-run one cheap step of the recipe and compare with the manifest's figures.

    eval:teacher-small | eval:teacher-large | eval:untrained   re-evaluate (same seed and planner);
    teacher:small | teacher:large   re-train from the pooled store (`work`/pool from `build --work`, else the
                                    build's data/, checked against its sha256) and evaluate;
    online:<task>   re-run that task's online run in a temporary directory and evaluate.
    Returns {"stage", "expected", "measured", "tolerance", "ok"}.
    """
    from agent.mt_mini import recipe as R
    from agent.checkpoint import load_world_model

    directory = Path(directory or ASSETS).resolve()
    m = manifest(directory)
    cfg = R.RecipeConfig.from_dict(m["recipe"])
    stages = {s["name"]: s for s in m["stages"]}
    if stage not in stages or stage == "pool":
        raise MiniBenchmarkError(f"verify-step: unknown or unverifiable stage {stage!r}; "
                                 f"choose from {[n for n in stages if n != 'pool']}")
    kind, _, arg = stage.partition(":")
    slack = 1.0
    with tempfile.TemporaryDirectory(prefix="mt-mini-verify-") as tmp:
        if kind == "eval":
            expected = stages[stage]["score"]
            spread = stages[stage]["episode_scores"]
            measured = R.eval_stage(cfg, arg, directory, log)["score"]
        elif kind == "teacher":
            target = stages[f"eval:teacher-{arg}"]
            expected, spread, slack = target["score"], target["episode_scores"], 2.0  # training is not bit-exact across machines
            # the pooled store: a build's work directory, else the build's published copy of it (data/)
            pool = Path(work or directory / "work") / "pool"
            if not pool.is_dir() and work is None and m.get("data"):
                R.check_finished_build(directory)  # its data/ match the manifest's sha256
                pool = directory / m["data"]["dir"]
            if not pool.is_dir():
                raise MiniBenchmarkError(f"verify-step {stage}: needs the pooled store {pool}; run "
                                         f"`build --work DIR` (stages online:* and pool) and pass --work DIR")
            model = R.train_teacher(cfg, cfg.teacher(arg), pool, Path(tmp) / "state", log)
            measured = R.evaluate_protocol(model, cfg)["score"]
            load_world_model(directory / m["teachers"][arg]["file"])  # the shipped file must still load
        else:
            expected = stages[stage]["score"]
            spread, slack = {arg: stages[stage]["episode_scores"]}, 2.0
            measured = R.online_stage(cfg, arg, Path(tmp), log)["score"]
    tolerance = slack * R.score_tolerance(spread)
    ok = abs(measured - expected) <= tolerance
    log(f"verify {stage}: manifest {expected:.2f}, measured {measured:.2f}, tolerance {tolerance:.2f} -> "
        f"{'OK' if ok else 'MISMATCH'}")
    return {"stage": stage, "expected": expected, "measured": measured, "tolerance": tolerance, "ok": ok}


# -- CLI ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from agent.mt_mini import recipe as R

    p = argparse.ArgumentParser(prog="python -m agent.mt_mini", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a busy machine)")
    sub = p.add_subparsers(dest="command", required=True)
    d = R.RecipeConfig()
    b = sub.add_parser("build", help="re-create the teachers and MANIFEST from nothing (resumes)")
    b.add_argument("--out", type=Path, default=Path("mt-mini-build"), help="teachers + MANIFEST go here")
    b.add_argument("--work", type=Path, default=None, help="replay data and stage records (default OUT/work)")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated MT30 task names")
    b.add_argument("--episode-steps", type=int, default=d.episode_steps)
    b.add_argument("--online-steps", type=int, default=d.online_steps, help="agent steps per single-task run")
    b.add_argument("--online-seed-steps", type=int, default=d.online_seed_steps)
    b.add_argument("--small-steps", type=int, default=d.teacher("small").steps, help="small-teacher updates")
    b.add_argument("--large-steps", type=int, default=d.teacher("large").steps, help="large-teacher updates")
    b.add_argument("--eval-episodes", type=int, default=d.eval_episodes)
    b.add_argument("--jobs", type=int, default=1, help="parallel processes for independent stages")
    b.add_argument("--only", default=None, help="run only the stages whose name starts with this (e.g. online)")
    b.add_argument("--from", dest="seed_from", type=Path, default=None,
                   help="start from a finished build (e.g. the shipped assets): its data and the stages whose "
                        "settings are unchanged are carried over, the rest re-run")
    v = sub.add_parser("verify-step", help="re-run one step and compare with the manifest")
    v.add_argument("stage", help="e.g. eval:teacher-large, teacher:small, online:cartpole-balance")
    v.add_argument("--dir", type=Path, default=None, help="build directory (default: the shipped assets)")
    v.add_argument("--work", type=Path, default=None, help="build work directory (teacher:* needs its pool)")
    s = sub.add_parser("dataset", help="roll the large teacher out into a new store (an alternative dataset)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--episodes-per-task", type=int, default=8)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--dir", type=Path, default=None, help="build directory (default: the shipped assets)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI; a setting or input it cannot use ends it with one `error:` line and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from agent.mt_mini import recipe as R

    import torch

    torch.set_num_threads(args.threads)
    if args.command == "build":
        base = R.RecipeConfig()
        teachers = (R.TeacherRecipe(**{**R.SMALL_TEACHER.__dict__, "steps": args.small_steps}),
                    R.TeacherRecipe(**{**R.LARGE_TEACHER.__dict__, "steps": args.large_steps}))
        cfg = R.RecipeConfig(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), seed=args.seed,
                             episode_steps=args.episode_steps, online_steps=args.online_steps,
                             online_seed_steps=args.online_seed_steps, teachers=teachers,
                             eval_episodes=args.eval_episodes, planner=dict(base.planner))
        m = R.build(cfg, args.out, args.work, jobs=args.jobs, threads=args.threads, only=args.only, seed_from=args.seed_from)
        if m is None:
            return 0
        print(f"MT-mini built in {args.out}: " + ", ".join(f"teacher-{k} {t['score']:.1f}" for k, t in m["teachers"].items())
              + f", untrained {m['baselines']['untrained']['score']:.1f} (max {m['score_max']:g})")
        return 0
    if args.command == "verify-step":
        return 0 if verify_step(args.stage, args.dir, args.work)["ok"] else 1
    started = time.perf_counter()
    store = collect_dataset(teacher_path("large", args.dir), args.out, dataset_spec(args.episodes_per_task, args.dir, args.seed))
    print(f"{store.num_episodes} episodes written to {args.out} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
