"""distill-sweeps: run the TD-MPC-Opt ablations as Ray Tune sweeps.

  python sweeps/run.py --grid d_coef                       # MT-mini on this machine (quick preset)
  python sweeps/run.py --grid d_coef --preset smoke --out runs/smoke
  python sweeps/run.py --grid paper --preset paper --teacher 317=mt30-317M.pt --teacher 48=mt30-48M.pt \\
      --data /data/mt30-store --address auto --gpus-per-trial 0.25 --out s3://bucket/sweeps/paper
  python sweeps/run.py --grid d_coef=0,0.2,0.4 --grid teacher_size   # your own values, crossed grids

Results: OUT/sweep.json, OUT/results.jsonl (docs/results-format.md), OUT/report/report.md and the
trained students, OUT/students/<trial_id>/seed-<seed>/<quant>.pt (python -m agent.evaluate FILE).
Learning curves (losses, grad norm, lr, updates/s, per-task scores): tensorboard --logdir OUT
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]  # default output under runs/; the packages come from the install

os.environ.setdefault("MUJOCO_GL", "disable")

from agent.errors import ConfigError, DistillError  # noqa: E402
from sweeps.config import PRESETS, TRIAL_OWNED, TrialConfig, check_setting_type, parse_override, preset_config  # noqa: E402
from sweeps import storage  # noqa: E402
from sweeps.space import DEFAULT_SPACE, corner_points, parse_space  # noqa: E402
from sweeps.grids import (GRID_KEYS, GRID_NAMES, GridSpec, check_grid_values, cross_points, describe_grids,  # noqa: E402
                          parse_grids, specs_swept_keys)

EXPERIMENT = "sweep"
SETTINGS = {f.name for f in fields(TrialConfig)}


class UsageError(DistillError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeps/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=None, metavar="GRID",
                   help=f"ablation grid: {', '.join(GRID_NAMES)} (default d_coef); or KEY=V1,V2,... with your own "
                        f"values for KEY in {', '.join(GRID_KEYS)} (e.g. --grid d_coef=0,0.2,0.4); repeat to cross "
                        "grids (--grid d_coef --grid teacher_size runs the product)")
    p.add_argument("--preset", default="quick", help=f"{', '.join(PRESETS)} (default quick: the MT-mini benchmark)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per grid point, trained as one population in one trial (default: the preset's; quick 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trial setting (JSON values), e.g. --set steps=5000 --set eval_episodes=3")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid",
                   help="grid: the named grid; optuna: Optuna TPE over d_coef, batch size and lr with ASHA stopping")
    p.add_argument("--num-samples", type=int, default=8, help="trials of an optuna search (default 8)")
    p.add_argument("--space", action="append", default=None, metavar="KEY=KIND:ARGS",
                   help="a searched setting of --search optuna, e.g. d_coef=uniform:0:1, lr=loguniform:1e-4:1e-3, "
                        "batch_size=choice:128,256 (repeatable; default: d_coef, batch_size and lr)"),
    p.add_argument("--out", default=None,
                   help="result directory (default runs/<grid>-<preset>), or an object store URI: s3://BUCKET/PATH, "
                        "gs://BUCKET/PATH; an S3-compatible store via AWS_ENDPOINT_URL_S3=http://HOST:PORT or "
                        "s3://BUCKET/PATH?endpoint_override=HOST:PORT&scheme=http (README: object storage)")
    p.add_argument("--teacher", action="append", default=[], metavar="[LABEL=]PATH",
                   help="teacher checkpoint (any TD-MPC2 layout); LABEL=PATH names teachers for the teacher_size grid")
    p.add_argument("--data", default=None, help="episode store directory (python -m agent.data import-tdmpc2 makes one)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out, given its own --grid/--set/--seeds/--preset (refused "
                        "when they differ or there is nothing to resume); finished trials are kept")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster); default: embedded local Ray")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per trial (default 1; on this machine's own Ray, when there are more trials than "
                        "CPUs but fewer than twice as many, CPUs / trials, so that all run at once)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default 0)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial from its checkpoint (default 2)")
    p.add_argument("--no-report", action="store_true", help="skip writing the report")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log every trial's metrics to Weights & Biases project PROJECT (Ray Tune's "
                        "WandbLoggerCallback; needs `pip install wandb` and a wandb login)")
    p.add_argument("--list-settings", action="store_true",
                   help="print every --set setting with the preset's value (train.* = the agent's TrainConfig) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything as a sweep would, print its trials, resources, evaluations and output, "
                        "and exit without starting Ray or writing anything")
    return p


def trial_cpus(requested: float | None, trials: int, cpus: float, gpus_per_trial: float, address: str | None) -> float:
    """CPUs each trial asks Ray for: `requested`, else 1, except on this machine's own Ray (no
    `address`, no GPUs) when trials number more than the CPUs but fewer than twice as many: then
    CPUs / trials (rounded down to 1/1000), so all run at once instead of a second round that
    leaves CPUs idle. (Each trial runs one torch thread either way.)"""
    if requested is not None:
        return requested
    if address is None and gpus_per_trial == 0 and cpus < trials < 2 * cpus:
        return math.floor(1000 * cpus / trials) / 1000
    return 1.0


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate_args(args: argparse.Namespace) -> tuple[TrialConfig, dict[str, Any]]:
    """Everything that can be checked before Ray starts. Returns the base config and overrides."""
    if args.space and args.search != "optuna":
        raise UsageError("--space sets the searched settings of --search optuna; add --search optuna")
    if args.search == "optuna":
        parse_space(args.space)  # ConfigError names the bad --space item
    from agent.tasksets import task_spec

    specs = grid_specs(args)
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    _positive("--num-samples", args.num_samples)
    if args.cpus_per_trial is not None:
        _positive("--cpus-per-trial", args.cpus_per_trial)
    _positive("--gpus-per-trial", args.gpus_per_trial, allow_zero=True)
    _positive("--max-concurrent", args.max_concurrent, allow_zero=True)
    _positive("--max-failures", args.max_failures, allow_zero=True)
    overrides = dict(parse_override(item) for item in args.set)
    for item in args.set:  # each value against its setting's declared type, named as the user wrote it
        key, value = parse_override(item)
        if key in SETTINGS:
            try:
                check_setting_type(key, value)
            except ConfigError as exc:
                raise UsageError(f"--set {item}: {exc}") from None
    base = preset_config(args.preset).with_overrides(overrides).validate()
    for spec in specs:  # the values of user grids, as --set values are checked
        try:
            check_grid_values(spec, base)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    for task in base.eval_tasks:
        task_spec(task)
    if args.wandb is not None:
        check_wandb(args.wandb)
    out = args.out if args.out is not None else _default_out(args)
    check_out(out)
    if args.resume:
        check_resume(args, base, out)
    else:
        check_no_earlier_sweep(out)
    preflight(args, base, overrides)
    return base, overrides


def grid_specs(args: argparse.Namespace) -> list[GridSpec]:
    """The --grid arguments, parsed (default: the d_coef grid)."""
    try:
        return parse_grids(args.grid or ["d_coef"])
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def check_wandb(project: str) -> None:
    if not project.strip():
        raise UsageError("--wandb needs a project name, e.g. --wandb distill-sweeps")
    if not wandb_installed():
        raise UsageError(f"--wandb {project}: the wandb package is not installed (pip install wandb, then wandb login), "
                         "or drop --wandb")


TUNER_STATE = "tuner.pkl"  # what Tune.Tuner.can_restore looks for in an experiment directory


def _local_out(out: str) -> Path:
    """Where the result files are written on this machine: OUT itself, or for a remote OUT its
    staging copy outside the checkout (sweeps.storage.staging_dir), mirrored to the store."""
    return Path(out) if not storage.is_remote(out) else storage.staging_dir(out)


def _restorable(out: str) -> bool:
    """Whether OUT holds Tune experiment state to resume from (as tune.Tuner.can_restore decides)."""
    _, storage_path = _storage(out)
    if not storage.is_remote(storage_path):
        return (Path(storage_path) / EXPERIMENT / TUNER_STATE).is_file()
    return storage.exists(storage.join(storage_path, EXPERIMENT, TUNER_STATE))


def _read_sweep_meta(out: str) -> dict[str, Any] | None:
    """OUT's sweep.json (for a remote OUT, the store's: the store is the truth), None when unreadable."""
    from sweeps.results import SWEEP_FILE

    try:
        if storage.is_remote(out):
            data = storage.read_bytes(storage.join(out, SWEEP_FILE))
            return None if data is None else json.loads(data.decode())
        local = Path(out) / SWEEP_FILE
        return json.loads(local.read_text()) if local.is_file() else None
    except (OSError, ValueError):
        return None


def sweep_identity(args: argparse.Namespace, base: TrialConfig) -> dict[str, Any]:
    """What makes a sweep the sweep it is (recorded in sweep.json; --resume must match it)."""
    return {"preset": args.preset, "search": args.search, "grids": [str(s) for s in grid_specs(args)],
            "seeds": args.seeds or base.num_seeds, "base_config": base.to_dict(),
            "space": list(args.space or DEFAULT_SPACE) if args.search == "optuna" else None}


def _flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in config.items() if k != "train"}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and value:
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("train.", config.get("train") or {})
    return flat


def resume_difference(now: dict[str, Any], before: dict[str, Any]) -> str | None:
    """The first way in which this command's sweep (`now`, sweep_identity) differs from the one
    recorded in sweep.json (`before`), as the flags that differ; None when they agree."""
    if before.get("preset") not in (None, now["preset"]):
        return f"--preset {now['preset']} here, --preset {before['preset']} in the sweep being resumed"
    if before.get("search", "grid") != now["search"]:
        return f"--search {now['search']} here, --search {before.get('search', 'grid')} in the sweep being resumed"
    old_grids = before.get("grids")
    if old_grids is None and before.get("grid") not in (None, "search"):
        old_grids = [before["grid"]]
    if now["search"] == "grid" and old_grids is not None and old_grids != now["grids"]:
        return (f"--grid {' --grid '.join(now['grids'])} here, --grid {' --grid '.join(old_grids)} "
                "in the sweep being resumed")
    if before.get("seeds") not in (None, now["seeds"]):
        return f"--seeds {now['seeds']} here, --seeds {before['seeds']} in the sweep being resumed"
    old, new = _flat_settings(before.get("base_config") or {}), _flat_settings(now["base_config"])
    for key in list(new) + [k for k in old if k not in new]:
        if (key in old and key in new and old[key] == new[key]) or \
                (not key.startswith("train.") and (key not in old or key not in new)):  # a setting newer than the sweep
            continue
        here = f"--set {key}={json.dumps(new[key])}" if key in new else f"no --set {key}"
        there = f"{key}={json.dumps(old[key])}" if key in old else f"no {key}"
        return f"{here} here, {there} in the sweep being resumed"
    return None


def check_resume(args: argparse.Namespace, base: TrialConfig, out: str) -> None:
    """--resume continues the sweep at OUT as it was started: refuse when there is nothing to
    restore, or when this command's grid, settings, seeds, preset or search differ from sweep.json's."""
    shown = storage.display(out) if storage.is_remote(out) else out
    if not _restorable(out):
        raise UsageError(f"--resume: nothing to resume at {shown} (no Tune experiment state in it); "
                         "drop --resume to start the sweep there")
    before = _read_sweep_meta(out)
    if before is None:
        raise UsageError(f"--resume: {shown} has Tune state but no readable sweep.json, so this command cannot be "
                         "checked against the sweep it would resume; use a new --out")
    difference = resume_difference(sweep_identity(args, base), before)
    if difference is not None:
        raise UsageError(f"--resume at {shown}: {difference}; resume with the sweep's own arguments, or start a "
                         "new sweep in another --out")


def check_no_earlier_sweep(out: str) -> None:
    """A new sweep (no --resume) needs an OUT without an earlier sweep's results or Tune state: it
    would replace that sweep's sweep.json and mix its rows into the new report."""
    from sweeps.results import RESULTS_FILE

    shown = storage.display(out) if storage.is_remote(out) else out
    if storage.is_remote(out):
        data = storage.read_bytes(storage.join(out, RESULTS_FILE))
        text = data.decode(errors="replace") if data is not None else ""
    else:
        path = Path(out) / RESULTS_FILE
        text = path.read_text(errors="replace") if path.is_file() else ""
    rows = sum(1 for line in text.splitlines() if line.strip())
    state = _restorable(out)
    if not rows and not state:
        return
    counted = f"{rows} result row{'s' if rows != 1 else ''}" if rows else ""
    held = " and ".join(part for part in (counted, "Tune state" if state else "") if part)
    resume = "--resume continues it (with its own arguments); " if state else ""
    raise UsageError(f"--out {shown} already holds a sweep ({held}): {resume}start a new sweep in another --out "
                     "(more seeds: run them into a new --out and pool both with python analysis/report.py OUT1 OUT2 "
                     "--out DIR)")


REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "file")  # pyarrow file systems Tune's storage can use (sweeps/storage.py)
PACKAGES = ("agent", "sweeps", "analysis")


def check_out(out: str) -> None:
    """--out must be a URI of a known store, or a writable directory (existing or creatable) outside
    the source packages. Nothing is created here."""
    if not out.strip():
        raise UsageError("--out is empty: give a result directory (or s3://BUCKET/PATH, gs://BUCKET/PATH)")
    if "://" in out:
        scheme, _, rest = out.partition("://")
        if scheme not in REMOTE_SCHEMES:
            raise UsageError(f"--out {out}: unsupported storage scheme {scheme!r}; use a local directory or "
                             f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
        if not storage.split_query(rest)[0].strip("/"):
            raise UsageError(f"--out {storage.display(out)}: no bucket or path after {scheme}://")
        problem = storage.check_reachable(out)
        if problem is not None:
            raise UsageError(f"--out {storage.display(out)}: {problem}")
        return
    path = Path(out).resolve()
    if path == _REPO:
        raise UsageError(f"--out {out}: the repository root; choose a directory of its own (default runs/<grid>-<preset>)")
    for name in PACKAGES:
        package = _REPO / name
        if path == package or package in path.parents:
            raise UsageError(f"--out {out}: inside the {name}/ package; choose a directory outside the source "
                             "packages (default runs/<grid>-<preset>)")
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: the directory is not writable")
        return
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise UsageError(f"--out {out}: cannot create it: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it: {ancestor} is not writable")


def preflight(args: argparse.Namespace, base: TrialConfig, overrides: dict[str, Any]) -> None:
    """Build and check, on this machine and before Ray starts, everything each trial of the sweep
    will build from its settings (sweeps.preflight.check_trial); nothing is written."""
    from dataclasses import replace

    from sweeps.preflight import check_trial, describe_point, memory_limit, plan_inputs

    plan = plan_inputs(args.preset, args.teacher, args.data)
    inputs = plan.inputs
    memory = memory_limit(args.gpus_per_trial) if args.address is None else None

    def resolved(cfg: TrialConfig) -> TrialConfig:
        label = cfg.teacher_size if cfg.teacher_size in inputs.teachers else inputs.default_teacher
        return replace(cfg, teacher=cfg.teacher or inputs.teachers[label], data=cfg.data or inputs.data)

    # the base settings first, so that an error of the user's own values is reported without a grid point
    check_trial(resolved(replace(base, num_seeds=args.seeds or base.num_seeds)), plan, memory)
    configs = [TrialConfig.from_dict(c) for c in trial_configs(args, base, inputs.teachers, inputs.default_teacher, overrides)]
    if args.search == "optuna":  # the corners of the searched space (sweeps/run.py _new_tuner)
        configs = [replace(configs[0], **corner) for corner in corner_points(parse_space(args.space))]
    for cfg in configs:
        try:
            check_trial(resolved(cfg), plan, memory)
        except DistillError as exc:
            raise UsageError(f"trial {describe_point(cfg, base) or cfg.ablation}: {exc}") from None


def _default_out(args: argparse.Namespace) -> str:
    return str(_REPO / "runs" / f"{'-x-'.join(s.key for s in grid_specs(args))}-{args.preset}")


def trial_configs(args: argparse.Namespace, base: TrialConfig, teachers: dict[str, str], default_teacher: str,
                  overrides: dict[str, Any]) -> list[dict[str, Any]]:
    labels = [k for k in teachers if k != "default"] or [default_teacher]
    specs = grid_specs(args)
    for spec in specs:
        unknown = [v for v in spec.values or () if spec.key == "teacher_size" and v not in teachers]
        if unknown:
            raise UsageError(f"--grid {spec}: no teacher labelled {unknown[0]!r}; teachers: {', '.join(labels)} "
                             "(--teacher LABEL=PATH names them)")
    points = cross_points(specs, base, labels)
    configs = []
    num_seeds = args.seeds or base.num_seeds
    for point in points:  # one trial per grid point, its seeds trained together (TrialConfig.num_seeds)
        values = {**point, **{k: v for k, v in overrides.items() if k not in point}, "num_seeds": num_seeds}
        cfg = base.with_overrides(values)
        label = cfg.teacher_size if cfg.teacher_size in teachers else default_teacher
        cfg.teacher, cfg.teacher_size = cfg.teacher or teachers[label], label
        configs.append(cfg.validate().to_dict())
    return configs


def _storage(out: str) -> tuple[bool, str]:
    """(whether OUT is remote, Tune's storage_path: OUT/ray, a URI keeping OUT's query options)."""
    remote = storage.is_remote(out)
    return remote, storage.join(out, "ray") if remote else str(Path(out).resolve() / "ray")


def run_sweep(args: argparse.Namespace) -> Path:
    base, overrides = validate_args(args)
    if args.address is None:
        check_local_gpus(args.gpus_per_trial, base)
    out = args.out or _default_out(args)
    remote, storage_path = _storage(out)
    local_out = _local_out(out)
    local_out.mkdir(parents=True, exist_ok=True)
    if remote:  # the store is the truth: continue from its result files, not from a stale staging copy
        storage.download_results(out, local_out)
    inputs = resolve_inputs_for(args, local_out)
    configs = trial_configs(args, base, inputs.teachers, inputs.default_teacher, overrides)
    for cfg in configs:
        cfg["data"] = cfg["data"] or inputs.data

    import ray
    from ray import tune
    from sweeps.results import merge_rows, read_rows, rows_from_result_grid, write_rows, write_sweep_meta
    from sweeps.tune_adapter import trainable

    # written first: with the rows streamed to results.jsonl, a report can be made mid-sweep. A
    # resumed sweep keeps its own (check_resume found it equal to this command's)
    store_tasks = _store_tasks(inputs.data)
    specs = grid_specs(args)
    if not (args.resume and _read_sweep_meta(out) is not None):
        write_sweep_meta(local_out, {
            **sweep_identity(args, base),
            "name": f"{describe_grids(specs)}-{args.preset}",
            "grid": describe_grids(specs) if args.search == "grid" else "search",
            "swept": specs_swept_keys(specs) if args.search == "grid" else [d.key for d in parse_space(args.space)],
            "tasks": base.eval_tasks or store_tasks,
            "task_set": "mt30" if len(store_tasks) == 30 else ("mt-mini" if args.preset == "quick" else args.preset),
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "teacher": {"paths": inputs.teachers, "default": inputs.default_teacher},
            "data": inputs.data, "trials": len(configs),
        })
        if remote:  # at once: a resume (from any machine) is checked against it
            storage.upload_results(local_out, out, report=False)

    # no --address: a Ray of this process's own, never a cluster already running on the machine
    ray.init(address=args.address or "local", include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"DISTILL_TRIAL_THREADS": str(max(1, int(args.cpus_per_trial or 1))),
                                                                 "MUJOCO_GL": os.environ["MUJOCO_GL"]}})
    try:
        if args.address is not None:
            check_cluster_gpus(args.gpus_per_trial, ray.cluster_resources().get("GPU", 0.0))
        trials = args.num_samples if args.search != "grid" else len(configs)
        machine_cpus = ray.cluster_resources().get("CPU", 1.0)
        cpus = trial_cpus(args.cpus_per_trial, trials, machine_cpus, args.gpus_per_trial, args.address)
        if cpus != (args.cpus_per_trial or 1.0):
            print(f"{trials} trials on {machine_cpus:g} CPUs: all at once, {cpus:g} CPU each", file=sys.stderr)
        resources = {"cpu": cpus, "gpu": args.gpus_per_trial}
        fn = tune.with_resources(trainable, resources)
        experiment = f"{storage_path}/{EXPERIMENT}"
        # Tune's legacy console output: the only one that takes a progress reporter (CLIReporter)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        if args.resume:  # check_resume found it restorable and the same sweep
            print(f"resuming {storage.display(experiment) if remote else experiment}", file=sys.stderr)
            tuner = _restore(experiment, fn)
            _retarget_rows(tuner, local_out, out if remote else None)
        else:
            tuner = _new_tuner(args, fn, configs, base, storage_path, local_out)
        grid = tuner.fit()
        rows = merge_rows(read_rows(local_out), rows_from_result_grid(grid))
        _keep_missing_students(tuner, grid)
    finally:
        ray.shutdown()
    write_rows(local_out, rows)
    if not args.no_report:
        subprocess.run([sys.executable, "-m", "analysis.report", str(local_out)], check=False)
    if remote:
        storage.upload_results(local_out, out)
    return local_out


def _restore(experiment: str, fn):
    """tune.Tuner.restore, without Tune's warning that the trials not yet started have no metrics
    ("Failed to fetch metrics for N trial(s)", from the restored experiment's analysis; with
    storage in an object store it lists every pending trial)."""
    import logging

    from ray import tune

    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        return tune.Tuner.restore(experiment, trainable=fn, resume_errored=True)
    finally:
        analysis_log.setLevel(level)


def _stream_rows(tuner):
    """The sweep's StreamRows callback in `tuner`'s run config (unpickled with a restored experiment)."""
    from sweeps.tune_adapter import StreamRows

    local_tuner = getattr(tuner, "_local_tuner", None)
    run_config = local_tuner.get_run_config() if local_tuner is not None else None
    return next((c for c in getattr(run_config, "callbacks", None) or [] if isinstance(c, StreamRows)), None)


def _retarget_rows(tuner, local_out: Path, remote: str | None) -> None:
    """Point the restored experiment's StreamRows (unpickled with the first run's --out) at this
    command's: the same sweep, but the endpoint or credentials in a remote --out's query may differ."""
    stream = _stream_rows(tuner)
    if stream is not None:
        stream.out, stream.remote = local_out, remote


def _keep_missing_students(tuner, grid) -> None:
    """Each finished trial's students from its last checkpoint, where OUT/students/ lacks them: a
    driver killed between Tune storing that checkpoint and copying them, then resumed, skips the
    trial, so its copy is made here."""
    stream = _stream_rows(tuner)
    for result in grid if stream is not None else []:
        trial_id = (result.metrics or {}).get("trial_id")
        if result.checkpoint is not None and trial_id:
            stream.keep_students(trial_id, result.checkpoint, missing_only=True)


def check_local_gpus(gpus_per_trial: float, base: TrialConfig) -> None:
    """Refuse GPU requests this machine cannot meet (trials would wait for a GPU forever)."""
    import torch

    if gpus_per_trial > 0 and not torch.cuda.is_available():
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: this machine has no CUDA GPU (torch sees none); "
                         "drop the flag, or run on a GPU cluster with --address")
    if base.precision == "bf16" and gpus_per_trial == 0:
        raise UsageError("precision=bf16 is a CUDA option: it needs --gpus-per-trial > 0")
    if base.device == "cuda" and gpus_per_trial == 0:
        raise UsageError("device=cuda needs --gpus-per-trial > 0 (Ray gives a trial a GPU only when it asks for one)")


def check_cluster_gpus(gpus_per_trial: float, cluster_gpus: float) -> None:
    if gpus_per_trial > 0 and cluster_gpus < gpus_per_trial:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: the Ray cluster has {cluster_gpus:g} GPUs")


def resolve_inputs_for(args: argparse.Namespace, local_out: Path):
    from sweeps.setup import resolve_inputs

    return resolve_inputs(args.preset, args.teacher, args.data, local_out / "_setup")


def _store_tasks(data: str) -> list[str]:
    from agent.data import EpisodeStore

    return list(EpisodeStore(data).manifest.tasks)


def _new_tuner(args, fn, configs, base: TrialConfig, storage_path: str, local_out: Path):
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig

    from sweeps.tune_adapter import TrialNamer, progress_reporter

    searched = [d.key for d in parse_space(args.space)] if args.search == "optuna" else []
    swept = searched or specs_swept_keys(grid_specs(args))
    name_keys = None if args.search == "grid" and grid_specs(args)[0].key == "paper" else swept
    # CheckpointConfig(num_to_keep=None): with num_to_keep set, Tune forces an experiment snapshot
    # whenever a trial has checkpointed num_to_keep times since the last one, i.e. at every
    # evaluation of every trial with num_to_keep=1 ("Experiment state snapshotting has been
    # triggered multiple times ..."). A trial keeps its steps / eval_every checkpoints instead.
    run_config = RunConfig(name=EXPERIMENT, storage_path=storage_path, verbose=1, callbacks=run_callbacks(args, local_out),
                           failure_config=FailureConfig(max_failures=args.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=None),
                           progress_reporter=progress_reporter(swept, searched))
    naming = dict(trial_name_creator=TrialNamer(name_keys), trial_dirname_creator=TrialNamer(name_keys, dirname=True))
    if args.search == "optuna":
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        space = {"trial": configs[0], **{d.key: d.tune() for d in parse_space(args.space)}}
        tune_config = tune.TuneConfig(metric="score", mode="max", search_alg=OptunaSearch(seed=base.seed),
                                      scheduler=ASHAScheduler(time_attr="step", max_t=base.steps, grace_period=base.eval_every),
                                      num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent or None,
                                      **naming)
        return tune.Tuner(fn, param_space=space, tune_config=tune_config, run_config=run_config)
    tune_config = tune.TuneConfig(max_concurrent_trials=args.max_concurrent or None, **naming)
    return tune.Tuner(fn, param_space={"trial": tune.grid_search(configs)}, tune_config=tune_config, run_config=run_config)


def run_callbacks(args: argparse.Namespace, local_out: Path) -> list:
    """Tune callbacks of a sweep: rows to results.jsonl as they arrive, and with --wandb, Ray
    Tune's own W&B logger (one W&B run per trial, grouped by sweep; the rows' JSON stays out)."""
    from sweeps.tune_adapter import StreamRows

    remote = args.out if args.out is not None and storage.is_remote(args.out) else None
    callbacks = [StreamRows(local_out, remote=remote)]
    if args.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=args.wandb, group=local_out.name, excludes=["row_json"]))
    return callbacks


def dry_run_text(args: argparse.Namespace) -> str:
    """What `args` would run, after every check a sweep makes before Ray starts (validate_args): its
    trials with their seeds, updates, batch and teacher, each trial's resources, the evaluations and
    where the results would go. Starts nothing and writes nothing."""
    from sweeps.preflight import plan_inputs, where
    from sweeps.tune_adapter import TrialNamer

    base, overrides = validate_args(args)
    if args.address is None:
        check_local_gpus(args.gpus_per_trial, base)
    inputs = plan_inputs(args.preset, args.teacher, args.data).inputs
    configs = trial_configs(args, base, inputs.teachers, inputs.default_teacher, overrides)
    store_tasks = list(base.eval_tasks) or _planned_tasks(inputs.data)
    searched = [d.key for d in parse_space(args.space)] if args.search == "optuna" else []
    out = args.out or _default_out(args)
    seeds = args.seeds or base.num_seeds
    seeds_text = f"{seeds} seed{'' if seeds == 1 else 's'}"
    tasks_text = f"{len(store_tasks)} tasks ({', '.join(store_tasks)})"
    lines = ["dry run: checked as the sweep would be; nothing was started or written"]
    if searched:
        lines.append(f"search: optuna over {', '.join(searched)}, {args.num_samples} trials of {seeds_text} each, "
                     f"ASHA stopping; preset {args.preset}, on {tasks_text}")
    else:
        specs = grid_specs(args)
        lines.append(f"grid: {describe_grids(specs)}, preset {args.preset}: {len(configs)} trials x {seeds_text} = "
                     f"{len(configs) * seeds} students, on {tasks_text}")
        namer = TrialNamer(None if specs[0].key == "paper" else specs_swept_keys(specs))
        labels = [namer.label({"trial": cfg}) for cfg in configs]
        width = max(len(label) for label in labels)
        for label, cfg in zip(labels, configs):
            teacher = f"teacher {cfg['teacher_size']} ({where(cfg['teacher'])})" if cfg["d_coef"] > 0 else "no teacher"
            lines.append(f"  {label:<{width}}  {cfg['steps']} updates, batch {cfg['batch_size']}, {teacher}")
    trials = args.num_samples if searched else len(configs)
    if args.address is None:
        machine = float(os.cpu_count() or 1)
        cpus = trial_cpus(args.cpus_per_trial, trials, machine, args.gpus_per_trial, args.address)
        at_once = min(trials, int(machine // cpus)) if cpus > 0 else trials
        lines.append(f"each trial: {cpus:g} CPU, {args.gpus_per_trial:g} GPU; this machine's own Ray with {machine:g} "
                     f"CPUs runs {at_once} of the {trials} trials at once")
    else:
        lines.append(f"each trial: {args.cpus_per_trial or 1:g} CPU, {args.gpus_per_trial:g} GPU, on the Ray "
                     f"cluster at {args.address}")
    first = TrialConfig.from_dict(configs[0])
    points = ([0] if first.eval_at_start else []) + list(range(first.eval_every, first.steps, first.eval_every))

    def per_task(n: int) -> str:
        return f"{n} episode{'' if n == 1 else 's'} per task"

    during = ", ".join(str(p) for p in points)
    evaluation = (f"after updates {during} ({per_task(first.eval_episodes)}) and " if points else "") + \
        f"after the last ({per_task(first.episodes_at(first.steps))}), {first.eval_max_steps or 500}-step episodes"
    lines.append(f"evaluation: {evaluation}; final precisions: {', '.join(first.quant_modes) or 'none'}")
    lines.append(f"results: {storage.display(out) if storage.is_remote(out) else out} "
                 "(sweep.json, results.jsonl, report/, students/)")
    return "\n".join(lines)


def _planned_tasks(data: str) -> list[str]:
    """The task names of the store a sweep will read (the smoke preset's planned one included)."""
    from sweeps.setup import SMOKE_PLANNED, SMOKE_TASKS

    return list(SMOKE_TASKS) if data.startswith(SMOKE_PLANNED) else _store_tasks(data)


def list_settings(preset: str) -> str:
    """Every setting `--set` accepts, with its value in `preset`: the trial's own fields, then the
    agent's training settings as `train.*` (from agent.config.TrainConfig, nested as there)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = preset_config(preset)
    lines = [f"settings of preset {preset!r} (--set KEY=VALUE):"]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in cfg.to_dict().items() if k != "train"]

    def flatten(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                flatten(f"{prefix}{key}.", value)
            elif f"{prefix}{key}" not in owned:
                lines.append(f"  {prefix}{key} = {json.dumps(value)}")

    owned = {f"train.{k}" for k in TRIAL_OWNED} | {"train.distill.target", "train.distill.d_coef"}
    flatten("train.", cfg.train_config().to_dict())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def refuse(message: str):  # argparse's own errors, as one line like every other refusal
        raise UsageError(f"{message} (see --help)")

    parser.error = refuse  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list_settings:
        print(list_settings(args.preset))
        return 0
    try:
        if args.dry_run:
            print(dry_run_text(args))
            return 0
        out = run_sweep(args)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from sweeps.results import STUDENTS_DIR, student_file

    report = out / "report" / "report.md"
    students = f"{STUDENTS_DIR}/<trial_id>/{student_file('<seed>', '<quant>')}"
    if args.out is not None and storage.is_remote(args.out):
        where = storage.display(args.out)
        print(f"results: {where}/results.jsonl (staged in {out})")
        print(f"report:  {where + '/report/report.md' if report.exists() else '(not written)'}")
        if storage.exists(storage.join(args.out, STUDENTS_DIR), directory=True):
            print(f"students: {where}/{students}")
    else:
        print(f"results: {out / 'results.jsonl'}")
        print(f"report:  {report if report.exists() else '(not written)'}")
        if (out / STUDENTS_DIR).is_dir():
            print(f"students: {out}/{students}")
    from sweeps.results import RESULTS_FILE, read_rows

    total, failed, common = failure_summary(read_rows(out))
    where = out / RESULTS_FILE
    if total == 0:
        print(f"error: the sweep reported no result rows ({where})", file=sys.stderr)
        return 1
    if failed:
        cause = f"most common error ({common[1]} of them): {common[0]}"
        if failed == total:
            print(f"error: all {total} trials failed; {cause}; error rows in {where}", file=sys.stderr)
            return 1
        print(f"warning: {failed} of {total} trials failed; {cause}; error rows in {where}", file=sys.stderr)
    return 0


def failure_summary(rows: list[dict[str, Any]]) -> tuple[int, int, tuple[str, int] | None]:
    """(trials, failed trials, (most common error among the failed, how many failed with it)).
    A trial failed when every one of its members (seeds) has an error row."""
    from collections import Counter

    seeds: dict[str, set] = {}
    failed_seeds: dict[str, set] = {}
    errors: dict[str, list[str]] = {}
    for row in rows:
        trial, seed = row["trial_id"], (row.get("config") or {}).get("seed")
        seeds.setdefault(trial, set()).add(seed)
        if row.get("status") == "error":
            failed_seeds.setdefault(trial, set()).add(seed)
            errors.setdefault(trial, []).append(str(row.get("error") or "unknown error"))
    failed = [t for t in seeds if failed_seeds.get(t, set()) >= seeds[t] and t in failed_seeds]
    counts = Counter(message for t in failed for message in dict.fromkeys(errors[t]))
    return len(seeds), len(failed), counts.most_common(1)[0] if counts else None


if __name__ == "__main__":
    sys.exit(main())
