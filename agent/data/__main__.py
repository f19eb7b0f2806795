"""`python -m agent.data`: import the official dataset, inspect a store, collect rollouts, build a
teacher-target cache. Bad input prints one `error: ...` line on stderr and exits with status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _write_mode(args: argparse.Namespace) -> str:
    return "append" if args.append else "overwrite" if args.overwrite else "create"


def _add_write_mode(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--append", action="store_true", help="add episodes to an existing store (new version, atomic swap)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing store")


def cmd_import(args: argparse.Namespace) -> None:
    from agent.data.tdmpc2_import import import_tdmpc2

    store = import_tdmpc2(args.chunks, args.out, trust_pickle=args.trust_pickle, task_set=args.task_set,
                          mode=_write_mode(args), progress=not args.quiet)
    print(f"wrote {store}")


def cmd_info(args: argparse.Namespace) -> None:
    from agent.data.store import EpisodeStore

    store = EpisodeStore(args.store)
    if args.verify:
        store.verify()
    print(format_info(store, verified=args.verify))


def format_info(store, verified: bool = False) -> str:
    m = store.manifest
    lines = [
        f"episode store  {store.path}",
        f"format         {m.format} v{m.format_version}   uid {m.uid}",
        f"task set       {m.task_set} ({len(m.tasks)} tasks)",
        f"episodes       {m.episodes:,} x {m.episode_length} entries = {m.entries:,} entries, {m.transitions:,} transitions",
        f"dims           obs {m.obs_dim}, action {m.action_dim}",
        f"alignment      {m.alignment}",
        f"created        {m.created.get('utc', '?')} on {m.created.get('host', '?')} by {m.created.get('source') or '?'}",
        "arrays",
    ]
    for name, info in m.arrays.items():
        size = (store.path / info.file).stat().st_size
        lines.append(f"  {name:<11} {info.dtype:<4} {str(tuple(info.shape)):<22} {size / 2**20:10.1f} MiB  sha256 {info.sha256[:16]}…")
    counts = {}
    for task_id in store.task.tolist():
        counts[task_id] = counts.get(task_id, 0) + 1
    lines.append("episodes per task")
    lines += [f"  {tid:>3} {m.tasks[tid]:<26} {n:,}" for tid, n in sorted(counts.items())]
    lines.append("history")
    lines += [f"  {h.get('utc', '?')} {h.get('op', '?'):<9} -> {h.get('episodes_after', '?')} episodes  {h.get('source', '')}"
              for h in m.history]
    if verified:
        lines.append("checksums      all arrays match their sha256")
    return "\n".join(lines)


def cmd_collect(args: argparse.Namespace) -> None:
    from agent.data.collect import collect_to_store

    tasks = [t for t in args.tasks.split(",") if t]
    store = collect_to_store(args.checkpoint, args.out, tasks, args.episodes, args.seed, plan=args.plan,
                             noise_std=args.noise, num_envs=args.num_envs, mode=_write_mode(args),
                             episode_steps=args.episode_steps, progress=not args.quiet)
    print(f"wrote {store}")


def cmd_teacher_cache(args: argparse.Namespace) -> None:
    from agent.data.teacher_cache import TeacherCache

    cache = TeacherCache.get_or_build(args.store, args.teacher, pca_dim=args.pca_dim, device=args.device,
                                      batch_rows=args.batch_rows, progress=not args.quiet)
    print(f"teacher cache ready at {cache.directory}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-tdmpc2", help="convert official TD-MPC2 chunk_*.pt files into an episode store")
    p.add_argument("chunks", nargs="+", type=Path, help="chunk files, or directories of *.pt chunks (sorted)")
    p.add_argument("--out", required=True, type=Path, help="store directory to create")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the chunks (runs code from the file; only for trusted sources)")
    p.add_argument("--task-set", default="mt30", help="task set whose ids the chunks use (default mt30)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_write_mode(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="print a store's manifest")
    p.add_argument("store", type=Path)
    p.add_argument("--verify", action="store_true", help="also recompute every array's sha256 (reads the whole store)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("collect", help="roll a checkpoint out in MT30 environments into a new store")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--episodes", required=True, type=int, help="episodes per task")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True,
                   help="act with MPPI planning (default) or the policy prior's mean (--no-plan)")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian action noise (default 0)")
    p.add_argument("--num-envs", type=int, default=32, help="environments stepped in lockstep")
    p.add_argument("--episode-steps", type=int, default=500, help="agent steps per episode (default 500; less for smoke runs)")
    p.add_argument("--quiet", action="store_true")
    _add_write_mode(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("teacher-cache", help="build (or find) the teacher-target cache of a store")
    p.add_argument("store", type=Path)
    p.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint file")
    p.add_argument("--pca-dim", type=int, default=None, help="also cache teacher latents projected to K dims")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="store entries per teacher call (default 4096 on CPU, 65536 on CUDA)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_teacher_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # DistillError is a ValueError: bad input, not a bug
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
