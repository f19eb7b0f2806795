"""The paper's ablations as named grids of trial overrides (crossed with seeds by the runner)."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from agent.config import DISTILL_TARGETS, QUANT_MODES
from agent.errors import ConfigError
from sweeps.config import TrialConfig

PAPER_STEPS = (200_000, 337_000, 1_000_000)
D_COEFS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.45, 0.6, 0.9)  # the paper's d_coef grid
# The quick preset's d_coef grid: scratch and the two values the paper's d_coef claim rests on, its
# best (0.45, the published student `mt30_1M_steps_045dist`, the paper's "~0.4", so the report can
# quote the paper's 28.12 beside it) and its worst (0.9). 0.45 is also the d_coef of the quick
# teacher_size and target grids, so all three share their distilled setting. Three trials of 5
# students run at once on 2 cores (sweeps.run.trial_cpus); a fourth setting would add a second
# round. `--grid d_coef=0,0.1,0.4,0.9` runs any other values.
QUICK_D_COEFS = (0.0, 0.45, 0.9)
# The quick preset's target grid: the paper's own target ablation (reward against the two latent
# targets it reports, linear projection and PCA), plus scratch: two rounds of two trials on 2
# cores. The other targets (DISTILL_TARGETS) are this project's extensions; `--grid
# target=reward,value,...` or another preset runs them.
QUICK_TARGETS = ("reward", "latent_linear", "latent_pca")
BATCH_SIZES = (128, 256, 512, 1024)
GRID_NAMES = ("d_coef", "batch_size", "steps", "teacher_size", "target", "quant", "paper")


def SCRATCH(ablation: str) -> dict[str, Any]:  # noqa: N802 (a constant of one parameter)
    return dict(ablation=ablation, d_coef=0.0)


def _steps_values(base: TrialConfig) -> list[int]:
    if base.preset == "paper":
        return list(PAPER_STEPS)
    # the paper's 200k : 337k : 1M budget ratios, scaled to the preset's step budget
    return sorted({max(1, round(base.steps * s / PAPER_STEPS[-1])) for s in PAPER_STEPS})


def d_coef_values(base: TrialConfig) -> tuple[float, ...]:
    """The named d_coef grid's values for the preset of `base`."""
    return QUICK_D_COEFS if base.preset == "quick" else D_COEFS


def target_values(base: TrialConfig) -> tuple[str, ...]:
    """The named target grid's values for the preset of `base`."""
    return QUICK_TARGETS if base.preset == "quick" else DISTILL_TARGETS


def grid_points(name: str, base: TrialConfig, teacher_sizes: list[str]) -> list[dict[str, Any]]:
    """Override dicts (each with its `ablation` label) for the named grid."""
    if name == "d_coef":
        return [dict(ablation="d_coef", d_coef=v) for v in d_coef_values(base)]
    if name == "batch_size":
        return [dict(ablation="batch_size", batch_size=v) for v in BATCH_SIZES]
    if name == "steps":
        return [dict(ablation="steps", steps=v, eval_every=min(base.eval_every, v)) for v in _steps_values(base)]
    # teacher_size and target: plus the scratch student (d_coef 0, no teacher), the partner of
    # every setting's paired difference in the report
    if name == "teacher_size":
        return [dict(ablation="teacher_size", teacher_size=s) for s in teacher_sizes] + [SCRATCH("teacher_size")]
    if name == "target":
        return [dict(ablation="target", target=t) for t in target_values(base)] + [SCRATCH("target")]
    if name == "quant":  # one training run per seed, every precision evaluated at the end
        return [dict(ablation="quant", quant_modes=list(QUANT_MODES))]
    if name == "paper":
        points = [SCRATCH("d_coef")]  # the scratch baseline, once
        for sub in ("d_coef", "batch_size", "steps", "teacher_size", "target", "quant"):
            points += [p for p in grid_points(sub, base, teacher_sizes) if p.get("d_coef") != 0.0]
        return points
    raise ConfigError(f"unknown grid {name!r}; known: {', '.join(GRID_NAMES)}")


def swept_keys(name: str) -> list[str]:
    if name == "paper":
        return ["d_coef", "batch_size", "steps", "teacher_size", "target", "quant"]
    return [name, "d_coef"] if name in ("teacher_size", "target") else [name]


# -- grids the user writes (--grid KEY=V1,V2,...) and crossed grids (--grid A --grid B) ----------

# keys a user grid may give values for -> the TrialConfig field the values set (`quant` lists the
# precisions every student is evaluated under at the end: one point)
GRID_KEYS = {"d_coef": "d_coef", "batch_size": "batch_size", "steps": "steps", "teacher_size": "teacher_size",
             "target": "target", "lr": "lr", "quant": "quant_modes"}
_PARTNERED = ("teacher_size", "target")  # grids that carry the scratch student (d_coef 0) as a partner


@dataclass(frozen=True)
class GridSpec:
    """One --grid argument: a named grid (`values` None) or a key with the user's values."""

    key: str
    values: tuple | None = None

    def __str__(self) -> str:
        if self.values is None:
            return self.key
        return f"{self.key}={','.join(_format_value(v) for v in self.values)}"


def _format_value(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _parse_value(key: str, raw: str) -> Any:
    """`raw` as a value of the setting `key` (its declared type): strings stay strings (teacher
    labels such as 48), numbers are JSON numbers, an integer setting takes no fraction."""
    from sweeps.config import _hints, check_setting_type

    hint = _hints(TrialConfig)[GRID_KEYS[key]]
    if key == "quant":
        return raw
    if hint is str:
        value: Any = raw
    else:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    check_setting_type(GRID_KEYS[key], value)
    return value


def parse_grid(text: str) -> GridSpec:
    """`d_coef` (a named grid) or `d_coef=0,0.2,0.4` (the user's values, typed as the setting);
    raises ConfigError naming the argument."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        if key not in GRID_NAMES:
            raise ConfigError(f"unknown grid {key!r}; known: {', '.join(GRID_NAMES)} (or KEY=V1,V2,... with KEY one "
                              f"of {', '.join(GRID_KEYS)})")
        return GridSpec(key)
    if key not in GRID_KEYS:
        raise ConfigError(f"--grid {text}: cannot give values for {key!r}; keys: {', '.join(GRID_KEYS)}")
    items = [item.strip() for item in raw.split(",")]
    if not raw.strip() or any(not item for item in items):
        raise ConfigError(f"--grid {text}: give comma-separated values, e.g. --grid {key}=V1,V2")
    values = []
    for item in items:
        try:
            value = _parse_value(key, item)
        except ConfigError as exc:
            raise ConfigError(f"--grid {text}: {exc}") from None
        if key == "quant" and value not in QUANT_MODES:
            raise ConfigError(f"--grid {text}: unknown quantization mode {value!r}; known: {', '.join(QUANT_MODES)}")
        if value in values:
            raise ConfigError(f"--grid {text}: value {item} given twice")
        values.append(value)
    return GridSpec(key, tuple(values))


def parse_grids(texts: list[str]) -> list[GridSpec]:
    """Every --grid argument; a key may appear once, and `paper` stands alone."""
    specs = [parse_grid(t) for t in texts]
    keys = [s.key for s in specs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ConfigError(f"--grid {twice} given twice; give each key once (crossed grids: --grid A --grid B)")
    if "paper" in keys and len(specs) > 1:
        raise ConfigError("--grid paper runs every ablation; it cannot be crossed with other grids")
    return specs


def check_grid_values(spec: GridSpec, base: TrialConfig) -> None:
    """Each of a user grid's values must make a valid trial (ranges as for --set)."""
    from dataclasses import replace

    for value in spec.values or ():
        values = {GRID_KEYS[spec.key]: [value] if spec.key == "quant" else value}
        if spec.key == "steps":
            values["eval_every"] = min(base.eval_every, value)
        try:
            replace(base, **values).validate()
        except ConfigError as exc:
            raise ConfigError(f"--grid {spec}: {exc}") from None


def spec_points(spec: GridSpec, base: TrialConfig, teacher_sizes: list[str]) -> list[dict[str, Any]]:
    """The points of one --grid argument: the named grid's, or one per user value (plus the scratch
    partner for teacher_size and target, as their named grids)."""
    if spec.values is None:
        return grid_points(spec.key, base, teacher_sizes)
    if spec.key == "quant":
        return [dict(ablation="quant", quant_modes=list(spec.values))]
    field = GRID_KEYS[spec.key]
    points = []
    for value in spec.values:
        point = {"ablation": spec.key, field: value}
        if spec.key == "steps":
            point["eval_every"] = min(base.eval_every, value)
        points.append(point)
    return points + ([SCRATCH(spec.key)] if spec.key in _PARTNERED else [])


def cross_points(specs: list[GridSpec], base: TrialConfig, teacher_sizes: list[str]) -> list[dict[str, Any]]:
    """The trials of the --grid arguments: one grid's points, or the product of several grids'.

    A crossed sweep keeps one scratch student (d_coef 0) per combination of the other keys when a
    grid has a scratch partner (teacher_size, target) or d_coef is crossed: a scratch student uses
    neither teacher nor target, so those keys are dropped from it and its duplicates merged."""
    if len(specs) == 1:
        return spec_points(specs[0], base, teacher_sizes)
    label = " x ".join(s.key for s in specs)
    axes, partner = [], False
    for spec in specs:
        points = [{k: v for k, v in p.items() if k != "ablation"} for p in spec_points(spec, base, teacher_sizes)]
        scratch = [p for p in points if p == {"d_coef": 0.0} and spec.key != "d_coef"]
        partner = partner or bool(scratch)
        axes.append([p for p in points if p not in scratch])
    if partner:
        d_axis = next((axis for axis, spec in zip(axes, specs) if spec.key == "d_coef"), None)
        if d_axis is None:
            axes.append([{}, {"d_coef": 0.0}])
        elif not any(p["d_coef"] == 0.0 for p in d_axis):
            d_axis.insert(0, {"d_coef": 0.0})
    crossed: list[dict[str, Any]] = []
    for combination in itertools.product(*axes):
        point: dict[str, Any] = {"ablation": label}
        for part in combination:
            point.update(part)
        if point.get("d_coef", base.d_coef) == 0.0:
            point.pop("teacher_size", None)
            point.pop("target", None)
        if point not in crossed:
            crossed.append(point)
    return crossed


def specs_swept_keys(specs: list[GridSpec]) -> list[str]:
    """sweep.json's `swept` for the --grid arguments: each grid's keys, in order, once."""
    keys: list[str] = []
    for spec in specs:
        keys += [k for k in swept_keys(spec.key) if k not in keys]
    return keys


def describe_grids(specs: list[GridSpec]) -> str:
    """sweep.json's `grid`: the named grid as before, else the arguments joined ('d_coef x teacher_size')."""
    return " x ".join(str(s) for s in specs)
