"""The search space of `--search optuna`: `--space KEY=KIND:ARGS`, one per searched setting.

    d_coef=uniform:0:1          a float in [0, 1]
    lr=loguniform:1e-4:1e-3     a float, log-uniform
    batch_size=choice:128,256   one of the listed values (typed like the setting)
    steps=randint:1000:4000     an int in [low, high)

Without --space the default below is searched. The space is recorded in sweep.json.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from agent.errors import ConfigError

DEFAULT_SPACE = ("d_coef=uniform:0:1", "batch_size=choice:128,256,512,1024", "lr=loguniform:1e-4:1e-3")
KINDS = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: `values` are (low, high) for ranges, the options for `choice`."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def tune(self):
        """The Ray Tune sampler of this dimension."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*self.values)

    def corners(self) -> list[Any]:
        """The extreme values a trial can get (what the preflight checks)."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


def _number(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--space {item}: {text!r} is not a number") from None


def parse_dimension(item: str) -> Dimension:
    from sweeps.config import TrialConfig, check_setting_type, parse_override

    key, sep, spec = item.partition("=")
    kind, _, args = spec.partition(":")
    if not sep or not key or kind not in KINDS or not args:
        raise ConfigError(f"--space {item}: expected KEY=KIND:ARGS with KIND one of {', '.join(KINDS)} "
                          "(e.g. d_coef=uniform:0:1, batch_size=choice:128,256)")
    if key not in {f.name for f in fields(TrialConfig)}:
        raise ConfigError(f"--space {item}: unknown setting {key!r}")
    if kind == "choice":
        values = tuple(parse_override(f"{key}={v}")[1] for v in args.split(",") if v)
        if not values:
            raise ConfigError(f"--space {item}: choice needs at least one value")
    else:
        parts = args.split(":")
        if len(parts) != 2:
            raise ConfigError(f"--space {item}: {kind} needs LOW:HIGH")
        low, high = (_number(p, item) for p in parts)
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"--space {item}: needs LOW < HIGH{' and LOW > 0' if kind == 'loguniform' else ''}")
        values = (int(low), int(high)) if kind == "randint" else (low, high)
    for value in (values if kind == "choice" else Dimension(key, kind, values).corners()):
        try:
            check_setting_type(key, value)
            TrialConfig().with_overrides({key: value}).validate()  # the setting's own range checks
        except ConfigError as exc:
            raise ConfigError(f"--space {item}: {exc}") from None
    return Dimension(key, kind, values)


def parse_space(items: list[str] | None) -> list[Dimension]:
    """The dimensions of `--space` items (the default space when none is given); one per key."""
    dims = [parse_dimension(item) for item in (items or DEFAULT_SPACE)]
    keys = [d.key for d in dims]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--space: {repeated[0]!r} is given twice")
    return dims


def corner_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every combination of the dimensions' extreme values (2^n points, n = searched settings)."""
    points: list[dict[str, Any]] = [{}]
    for dim in dims:
        points = [{**p, dim.key: v} for p in points for v in dim.corners()]
    return points
