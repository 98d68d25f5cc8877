"""Search-space files (YAML) -> an Optuna define-by-run space, checked before anything runs.

A space file:

    description: what this space is for
    sampler: tpe              # tpe (default), random, or grid (every param a choice)
    params:                   # what Optuna proposes, in this order
      lr: {loguniform: [0.01, 1.0]}
      width_mult: {uniform: [0.5, 2.0]}
      batch_size: {choice: [128, 256, 512]}
      stage_dropout: {uniform: [0.0, 0.5], when: {batchnorm: false}}   # conditional
    fixed:                    # every trial gets these
      preset: seed
    baseline:                 # optional: the first config tried, a known-good start
      lr: 0.2

Distributions: uniform, loguniform, int ([low, high]; `log: true` for a log scale), choice (a
list). `when` names an earlier choice param and the value(s) that switch this one on; when it
is off the trial keeps the fixed (or default) value. Every bound and choice is checked against
what a trial can take (tuning/config.py), so a bad file fails here, naming the file and key.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import yaml

from tuning.config import PARAMS

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SAMPLERS = ("tpe", "random", "grid")
TOP_LEVEL_KEYS = ("description", "sampler", "params", "fixed", "baseline")
SET_BY_THE_SEARCH = {"epochs": "--max-epochs", "num_classes": "the data"}


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Dimension:
    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (param, values that switch this one on)

    def active(self, chosen: Mapping[str, Any]) -> bool:
        return all(param in chosen and chosen[param] in values for param, values in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.distribution == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.distribution == "loguniform")

    def optuna_distribution(self) -> optuna.distributions.BaseDistribution:
        if self.distribution == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.distribution == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def position(self, value: Any) -> float:
        """Where `value` sits in this dimension, from 0 to 1 (NaN when the param was off)."""
        if value is None:
            return math.nan
        if self.distribution == "choice":
            return self.choices.index(value) / max(1, len(self.choices) - 1)
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return value in self.choices
        return self.low <= value <= self.high


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str  # where it was read from
    text: str  # the file verbatim, for the record
    description: str
    sampler: str
    dimensions: tuple[Dimension, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    baseline: Mapping[str, Any] | None = None

    def suggest(self, trial: optuna.Trial, constants: Mapping[str, Any]) -> dict[str, Any]:
        """The define-by-run body: suggests the active params; returns the constants."""
        chosen: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active(chosen):
                chosen[dim.key] = dim.suggest(trial)
        return {**self.fixed, **constants}

    def define_by_run(self, constants: Mapping[str, Any]):
        """For OptunaSearch(space=...): a picklable callable, so a search can be resumed."""
        return functools.partial(self.suggest, constants=dict(constants))

    def optuna_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.sampler == "tpe":
            # multivariate: TPE models the params jointly, which matters for lr x batch size
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        # random, and grid past its points. (Optuna's own grid samplers stop the study when done,
        # which only works inside study.optimize, not with the ask-and-tell that Tune uses.)
        return optuna.samplers.RandomSampler(seed=seed)

    def first_points(self) -> list[dict[str, Any]]:
        """Configs to try before sampling: every point of a grid, else the baseline if any."""
        if self.sampler == "grid":
            keys = [dim.key for dim in self.dimensions]
            return [dict(zip(keys, values)) for values in itertools.product(*(dim.choices for dim in self.dimensions))]
        return [dict(self.baseline)] if self.baseline else []

    @property
    def grid_size(self) -> int:
        return len(self.first_points()) if self.sampler == "grid" else 0


# ---------------------------------------------------------------- loading


def shipped_spaces() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("search_spaces").iterdir() if p.name.endswith(".yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A shipped space by name (`allconv`, `paper`, `smoke`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpaceError(f"{path}: search-space file not found")
        return parse_space(path.read_text(), source=str(path), name=path.stem)
    shipped = resources.files("search_spaces") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise SpaceError(f"unknown search space {str(name_or_path)!r}: not a file, nor one of {', '.join(shipped_spaces())}")
    return parse_space(shipped.read_text(), source=f"search_spaces/{name_or_path}.yaml", name=str(name_or_path))


def parse_space(text: str, source: str, name: str) -> SearchSpace:
    def fail(where: str, message: str) -> SpaceError:
        return SpaceError(f"{source}: {where}: {message}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise fail(where, f"YAML syntax error: {getattr(err, 'problem', None) or err}") from err
    if not isinstance(doc, dict):
        raise SpaceError(f"{source}: a search space must be a YAML mapping with a 'params' key")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise fail(str(key), f"unknown top-level key; expected {', '.join(TOP_LEVEL_KEYS)}")
    sampler = doc.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise fail("sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    params, fixed = doc.get("params") or {}, doc.get("fixed") or {}
    if not isinstance(params, dict) or not params:
        raise fail("params", "must be a mapping of at least one parameter to its distribution")
    if not isinstance(fixed, dict):
        raise fail("fixed", "must be a mapping of parameter to value")

    dimensions: list[Dimension] = []
    for key, spec in params.items():
        check_key(str(key), fail, section="params")
        if key in fixed:
            raise fail(f"params.{key}", "is also in 'fixed'; give it in one place")
        dimensions.append(parse_dimension(str(key), spec, dimensions, lambda m, k=key: fail(f"params.{k}", m)))
    fixed_values = {}
    for key, value in fixed.items():
        check_key(str(key), fail, section="fixed")
        fixed_values[key] = check_value(key, value, lambda m, k=key: fail(f"fixed.{k}", m))
    if sampler == "grid":
        for dim in dimensions:
            if dim.distribution != "choice" or dim.when:
                raise fail(f"params.{dim.key}", "a grid needs every param to be an unconditional choice")

    baseline = parse_baseline(doc.get("baseline"), dimensions, fail)
    return SearchSpace(
        name=name, source=source, text=text, description=str(doc.get("description", "")),
        sampler=sampler, dimensions=tuple(dimensions), fixed=fixed_values, baseline=baseline,
    )  # fmt: skip


def check_key(key: str, fail, section: str) -> None:
    if key in SET_BY_THE_SEARCH:
        raise fail(f"{section}.{key}", f"is set by {SET_BY_THE_SEARCH[key]}, not by the space")
    if key not in PARAMS:
        raise fail(f"{section}.{key}", f"unknown parameter; known: {', '.join(k for k in PARAMS if k not in SET_BY_THE_SEARCH)}")


def check_value(key: str, value: Any, fail) -> Any:
    """A value a trial can take, with YAML's '1e-3' (read as a string) accepted as a number."""
    param = PARAMS[key]
    if isinstance(value, str) and param.kind in (int, float):
        try:
            value = float(value)
        except ValueError:
            pass
    try:
        return param.check(key, value)
    except ValueError as err:
        raise fail(str(err)) from None


def parse_dimension(key: str, spec: Any, earlier: list[Dimension], fail) -> Dimension:
    if not isinstance(spec, dict):
        raise fail(f"must be a mapping like {{uniform: [low, high]}} or {{choice: [a, b]}}, not {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k not in ("when", "log")]
    if extra:
        raise fail(f"unknown distribution or option {extra[0]!r}; use one of {', '.join(DISTRIBUTIONS)} (and 'when', 'log')")
    if len(kinds) != 1:
        raise fail(f"needs exactly one distribution of {', '.join(DISTRIBUTIONS)}")
    kind, args = kinds[0], spec[kinds[0]]
    param = PARAMS[key]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail("choice needs a non-empty list of values")
        choices = tuple(check_value(key, v, fail) for v in args)
        if len(set(choices)) != len(choices):
            raise fail("choice lists a value twice")
        dim = Dimension(key, kind, choices=choices)
    else:
        if param.kind not in (int, float):
            raise fail(f"{kind} needs a numeric parameter; {key} takes {', '.join(map(str, param.choices)) or param.kind.__name__}: use choice")
        if kind == "int" and param.kind is not int:
            raise fail(f"int needs a whole-number parameter; {key} is a float: use uniform or loguniform")
        if not isinstance(args, list) or len(args) != 2:
            raise fail(f"{kind} needs [low, high]")
        low, high = (check_value(key, v, fail) for v in args)
        if low >= high:
            raise fail(f"low ({low}) must be below high ({high})")
        log = bool(spec.get("log", False)) or kind == "loguniform"
        if log and low <= 0:
            raise fail(f"a log range needs low > 0, not {low}")
        dim = Dimension(key, kind, low=low, high=high, log=log)
    when = spec.get("when")
    if when is not None:
        dim = dataclasses.replace(dim, when=parse_when(when, earlier, fail))
    return dim


def parse_when(when: Any, earlier: list[Dimension], fail) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(when, dict) or not when:
        raise fail("'when' needs a mapping of an earlier choice param to its value(s)")
    by_key = {dim.key: dim for dim in earlier}
    conditions = []
    for param, values in when.items():
        parent = by_key.get(param)
        if parent is None or parent.distribution != "choice":
            raise fail(f"'when' names {param!r}, which must be a choice param listed above this one")
        values = tuple(values) if isinstance(values, list) else (values,)
        for value in values:
            if value not in parent.choices:
                raise fail(f"'when' value {value!r} is not among {param}'s choices {list(parent.choices)}")
        conditions.append((str(param), values))
    return tuple(conditions)


def parse_baseline(baseline: Any, dimensions: list[Dimension], fail) -> dict[str, Any] | None:
    if baseline is None:
        return None
    if not isinstance(baseline, dict):
        raise fail("baseline", "must be a mapping of param to value")
    by_key = {dim.key: dim for dim in dimensions}
    values = {}
    for key, value in baseline.items():
        if key not in by_key:
            raise fail(f"baseline.{key}", "is not a param of this space")
        value = check_value(str(key), value, lambda m, k=key: fail(f"baseline.{k}", m))
        if not by_key[key].contains(value):
            raise fail(f"baseline.{key}", f"{value!r} is outside the param's own range")
        values[key] = value
    return values
