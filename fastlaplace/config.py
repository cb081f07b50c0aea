"""Every setting of a training run, defined once: the :class:`Config` dataclass, the checks,
and the command-line flags of ``python -m fastlaplace.train``. Each data set's defaults are
its :class:`fastlaplace.datasets.DatasetSpec`'s.

Each field of :class:`Config` carries its flag's help text (and choices, metavar, nargs) in
its metadata, and what a resumed run may do with it; :func:`add_arguments` builds the flags
from the fields and :func:`check_types` checks a JSON file or a checkpoint against the
fields' types. A new setting is one new field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from types import UnionType

from .cli import MAXIMA, UsageError, check_device, check_seed, positive_float, positive_int
from .datasets import DATASETS
from .methods import METHODS
from .models import MODELS
from .options import ConvStrategy, FisherType, LogdetMethod, choices

LOGDET_METHODS = choices(LogdetMethod)

# What ``--resume`` does with a setting (the field's ``resume`` metadata):
SAME = "same"  # the default: it defines the problem, so it must equal the saved run's
MAY_CHANGE = "may change"  # may differ from the saved run's (the change is logged)
FROM_USER = "from the user"  # locates or unlocks files: never taken from a saved run, only from the user


def setting(default=None, help: str = "", *, group: str, metavar: str | None = None, choices=None,
            nargs: int | str | None = None, flag: bool = True, resume: str = SAME, default_factory=None):
    """A field of :class:`Config` with what its command-line flag and ``--resume`` need:
    ``help`` (the flag's help text; the default is appended), the flag's ``group`` in
    ``--help``, ``metavar``, ``choices`` and ``nargs`` (for a list), ``flag=False`` for a
    setting that is only read from files, and ``resume`` (SAME, MAY_CHANGE or FROM_USER)."""
    metadata = {"help": help, "group": group, "metavar": metavar, "choices": choices, "nargs": nargs, "flag": flag,
                "resume": resume}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Config:
    """Every setting of a run; ``None`` means the data set's default (its ``DatasetSpec``)."""

    dataset: str = setting("sinusoid", "the task distribution (fastlaplace.datasets)", group="problem",
                           choices=DATASETS)
    method: str = setting("llama", "the meta-learner: fomaml is first-order MAML (fastlaplace.methods)",
                          group="problem", choices=METHODS)
    iterations: int | None = setting(None, "meta-training iterations", group="meta-training", metavar="N",
                                     resume=MAY_CHANGE)
    meta_batch: int | None = setting(None, "tasks per meta-batch, all processes together", group="meta-training",
                                     metavar="N")
    meta_lr: float | None = setting(None, "β, Adam's step size", group="meta-training", metavar="β",
                                    resume=MAY_CHANGE)
    inner_lr: float | None = setting(None, "α, the inner loop's step size", group="meta-training", metavar="α",
                                     resume=MAY_CHANGE)
    inner_steps: int | None = setting(None, "K during meta-training", group="meta-training", metavar="K")
    test_inner_steps: list[int] | None = setting(None, "inner steps at evaluation", group="meta-training",
                                                 metavar="K", nargs="+")
    eta: float | None = setting(None, "LLAMA's weight of log det Ĥ", group="LLAMA", metavar="η")
    tau: float | None = setting(None, "LLAMA's prior precision", group="LLAMA", metavar="τ")
    logdet_method: str = setting("factored", "how LLAMA takes log det Ĥ, see docs/design.md §2", group="LLAMA",
                                 choices=LOGDET_METHODS)
    fisher: str = setting("auto", "which Fisher LLAMA's curvature uses, see fastlaplace.curvature", group="LLAMA",
                          choices=choices(FisherType))
    seed: int = setting(0, "seed of the initialisation and the training tasks", group="problem", metavar="S")
    device: str = setting("cpu", "cpu, cuda or cuda:N", group="run", metavar="DEVICE", resume=MAY_CHANGE)
    conv_strategy: str = setting(
        "grouped", "how the adapted convolutions run over the tasks: grouped, loop, or auto (the faster, timed per "
        "layer shape on first use: not bit-reproducible; recorded in the run's conv_strategy.json)", group="run",
        choices=choices(ConvStrategy), resume=MAY_CHANGE)
    task_chunk: int | None = setting(
        None, "run the network on at most N tasks at a time (default: all at once); same results up to rounding, "
        "a lower peak memory (1: about a per-task loop's), see fastlaplace.batched", group="run", metavar="N",
        resume=MAY_CHANGE)
    recompute_query: bool = setting(False, "keep no activations of the query pass: the backward recomputes them, one "
                                           "task chunk at a time (less memory, one more forward pass)", group="run",
                                    resume=MAY_CHANGE)
    out: str | None = setting(None, "output folder (default runs/DATASET-METHOD-seedS)", group="run",
                              metavar="DIR", resume=FROM_USER)
    checkpoint_every: int = setting(500, "iterations between checkpoints", group="run", metavar="N",
                                    resume=MAY_CHANGE)
    log_every: int = setting(50, "iterations between lines of metrics.jsonl", group="run", metavar="N",
                             resume=MAY_CHANGE)
    eval_tasks: int = setting(600, "test tasks of the final evaluation", group="run", metavar="N",
                              resume=MAY_CHANGE)
    eval_seed: int = setting(1_000_003, "seed of the test tasks", group="run", flag=False)
    val_every: int = setting(0, "iterations between validations on --val-tasks validation tasks (and one at the "
                                "start); the best validated parameters are kept as best.pt and tested at the end "
                                "beside the last (0: no validation)", group="run", metavar="N", resume=MAY_CHANGE)
    val_tasks: int = setting(200, "validation tasks of each validation (the same tasks every time)", group="run",
                             metavar="N", resume=MAY_CHANGE)
    val_seed: int = setting(2_000_003, "seed of the validation tasks", group="run", flag=False)
    cuda_graph: bool = setting(False, "capture the meta-iteration once as a CUDA graph and replay it (CUDA, one "
                                      "process; see fastlaplace.graphs)", group="run", resume=MAY_CHANGE)
    # sinusoid
    x_range: list[float] = setting(help="sinusoid input range", group="sinusoid", metavar=("LO", "HI"), nargs=2,
                                   default_factory=lambda: [-10.0, 10.0])
    support: int = setting(10, "sinusoid support points", group="sinusoid", metavar="N")
    query_points: int = setting(10, "sinusoid query points", group="sinusoid", metavar="N")
    # images
    data_root: str | None = setting(None, "folder of the image data set (see README: Data)", group="images",
                                    metavar="PATH", resume=FROM_USER)
    ways: int | None = setting(None, "classes per episode", group="images", metavar="N")
    shots: int | None = setting(None, "support images per class", group="images", metavar="K")
    query: int | None = setting(None, "query images per class", group="images", metavar="Q")
    filters: int | None = setting(None, "Conv4 filters (32 or 64); ResNet-12: the first block's width F (widths "
                                        "F, 2.5F, 5F, 10F; 64 gives 64-160-320-640)", group="images", metavar="N")
    model: str | None = setting(None, "the network (fastlaplace.models), one that the data set accepts: mlp for "
                                      "sinusoid, conv4 or resnet12 for images", group="problem", choices=MODELS)
    allow_pickle: bool = setting(False, "read miniImageNet's pickle files (loading a pickle can run code: only "
                                        "files you trust)", group="images", resume=FROM_USER)
    overwrite: bool = setting(False, "start a new run in DIR although it holds another run's results.json, "
                                     "metrics.jsonl or config.json (and no checkpoint): they are replaced",
                              group="run", resume=FROM_USER)

    def resolved(self) -> Config:
        """The data set's defaults filled in and the output folder named, then checked."""
        for registry in (DATASETS, METHODS):
            if getattr(self, registry.option) not in registry:
                raise UsageError(f"{registry.option} must be one of {tuple(registry)}, got "
                                 f"{getattr(self, registry.option)!r}")
        values = dataclasses.asdict(self)
        for key, default in DATASETS[self.dataset].settings().items():
            if values.get(key) is None:
                values[key] = default
        cfg = Config(**values)
        if cfg.out is None:
            cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.method}-seed{cfg.seed}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every setting; a message names the setting by its flag (``--meta-batch`` for meta_batch)."""
        check_types(dataclasses.asdict(self), "the configuration")
        for name in ("iterations", "meta_batch", "inner_steps", "checkpoint_every", "log_every", "eval_tasks",
                     "support", "query_points"):
            positive_int(flag(name), getattr(self, name), 1, MAXIMA.get(name))
        for name in ("meta_lr", "inner_lr", "tau"):
            positive_float(flag(name), getattr(self, name))
        if self.task_chunk is not None:
            positive_int("--task-chunk", self.task_chunk, 1, MAXIMA["meta_batch"])
        positive_int("--val-every", self.val_every, 0, MAXIMA["iterations"])
        positive_int("--val-tasks", self.val_tasks, 1, MAXIMA["eval_tasks"])
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise UsageError(f"--eta must be >= 0, got {self.eta!r}")
        limit = MAXIMA["test_inner_steps"]
        if not self.test_inner_steps or any(not 0 <= s <= limit for s in self.test_inner_steps):
            raise UsageError(f"--test-inner-steps must be integers from 0 to {limit}, got {self.test_inner_steps!r}")
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise UsageError(f"{flag(f.name)} must be one of {tuple(allowed)}, got {getattr(self, f.name)!r}")
        lo_hi = self.x_range
        if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or not lo_hi[0] < lo_hi[1]:
            raise UsageError(f"--x-range must be two finite numbers LO < HI, got {lo_hi!r}")
        if self.cuda_graph and self.recompute_query:  # the recomputation saves and restores the RNG state
            raise UsageError("--recompute-query cannot be captured in a CUDA graph (--cuda-graph): use one of them")
        check_device(self.device)
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise UsageError(f"--cuda-graph needs --device cuda (CUDA graphs exist only on a GPU), got {self.device!r}")
        check_seed("--seed", self.seed)
        check_seed("eval_seed", self.eval_seed)
        check_seed("val_seed", self.val_seed)
        spec = DATASETS[self.dataset]
        if self.model not in spec.models:
            raise UsageError(f"--model {self.model!r} is not for {self.dataset}: use {' or '.join(spec.models)}")
        # The episode sizes: set by the data sets that use them (their defaults), else unused.
        if self.ways is not None:
            positive_int("--ways", self.ways, 2, MAXIMA["ways"])
        for name in ("shots", "query", "filters"):
            if getattr(self, name) is not None:
                positive_int(flag(name), getattr(self, name), 1, MAXIMA[name])
        if spec.data_root and not self.data_root:
            raise UsageError(f"--data-root is required for {self.dataset} (see README: Data)")

    def batch_memory(self, tasks: int, steps: int, graph: bool = True) -> tuple[str, int]:
        """(a task in flags, bytes): a lower bound on the memory of ``tasks`` tasks of this
        (resolved) configuration adapted for ``steps`` inner steps: the parameters (with Adam's
        two moments) and, per example of a forward pass, its input and two float32 activations
        of the first layer. With ``graph`` (meta-training) the passes of every inner step over
        the support set and the one over the query set are kept for the meta-gradient; without
        (evaluation) one pass at a time. Meta-training on sinusoids with 10⁵ support points
        measures 2.0 times this bound for MAML and 3.4 times for LLAMA."""
        what, support, query, per_example, params = DATASETS[self.dataset].footprint(self)
        passes = support * max(steps, 1) + query if graph else max(support, query)
        return what, 4 * (3 * params + tasks * passes * per_example)


def flag(name: str) -> str:
    """The command-line flag of a setting: ``--meta-batch`` for ``meta_batch``."""
    return "--" + name.replace("_", "-")


def _resume_rule(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"] == name)


RESUMABLE_CHANGES = _resume_rule(MAY_CHANGE)  # a resumed run may change these (they do not change the problem)
USER_ONLY = _resume_rule(FROM_USER)  # never taken from a saved run (a resumed run writes where it was found)


# ---------------------------------------------------------------------------- types
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _options(tp) -> list:
    """The alternatives of a field's type: ``int | None`` -> [int, NoneType]."""
    return list(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, UnionType) else [tp]


def _matches(value, tp) -> bool:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(v, inner) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON's true is not a number
        return False
    return isinstance(value, (int, float) if tp is float else tp)


def _name(tp) -> str:
    if typing.get_origin(tp) is list:
        return {int: "a list of integers", float: "a list of numbers"}[typing.get_args(tp)[0]]
    return _NAMES[tp]


def field_types() -> dict[str, object]:
    """Each field's type, e.g. ``{"iterations": int | None, ...}``."""
    return typing.get_type_hints(Config)


def check_types(values: dict, source: str) -> None:
    """Refuse unknown settings and values of the wrong type (from a file or a checkpoint)."""
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UsageError(f"{source}: unknown settings {unknown}")
    for name, value in values.items():
        options = _options(types[name])
        if not any(_matches(value, tp) for tp in options):
            raise UsageError(f"{source}: {name} must be {' or '.join(_name(tp) for tp in options)}, got {value!r}")


def config_from_dict(values, source: str) -> Config:
    """A :class:`Config` from the settings of a file or a checkpoint (checked against the fields)."""
    if not isinstance(values, dict):
        raise UsageError(f"{source} must be a JSON object of settings, got {type(values).__name__}")
    check_types(values, source)
    dataset = values.get("dataset", Config.dataset)
    if "model" not in values and dataset in DATASETS:
        # saved before the model was a setting: the data set's default network was used
        values = {**values, "model": DATASETS[dataset].models[0]}
    return Config(**values)


def read_settings(path: Path) -> dict:
    """The settings in a JSON file (``--config``, a run's config.json), checked against the fields."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"no file {path}") from exc
    except (ValueError, RecursionError) as exc:  # also a file that is not UTF-8, or nested too deeply
        raise UsageError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a JSON object of settings, got {type(values).__name__}")
    check_types(values, str(path))
    return values


# ---------------------------------------------------------------------------- resuming
def check_resumable(saved: Config, now: Config, source: str) -> None:
    """Refuse to continue ``saved`` (a run's settings) with settings that change its problem."""
    rules = {f.name: f.metadata["resume"] for f in dataclasses.fields(Config)}
    changed = [k for k, rule in rules.items() if rule == SAME and getattr(saved, k) != getattr(now, k)]
    if changed:
        raise UsageError(f"{source} was written with other settings of {', '.join(changed)} ("
                         + ", ".join(f"{k}: saved {getattr(saved, k)!r}, now {getattr(now, k)!r}" for k in changed)
                         + f"); a resumed run may only change {', '.join(RESUMABLE_CHANGES)}: "
                         "use a new --out for a different run")


def resumed_changes(saved: Config, now: Config) -> list[tuple[str, object, object]]:
    """(name, saved, now) of each setting a resumed run changed."""
    return [(k, getattr(saved, k), getattr(now, k)) for k in RESUMABLE_CHANGES if getattr(saved, k) != getattr(now, k)]


# ---------------------------------------------------------------------------- command line
def _default_text(f: dataclasses.Field) -> str:
    """The field's own default, as its flag's help names it (nothing for ``None``, for a
    switch, or when the help text names the default itself)."""
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value is None or isinstance(value, bool) or "default" in f.metadata["help"]:
            return ""
        return f" (default: {_show(value)})"
    return ""


def _dataset_defaults_text(name: str) -> str:
    """Each data set's default of a field whose own default is ``None``."""
    per_set = {d: spec.settings()[name] for d, spec in DATASETS.items() if name in spec.settings()}
    if not per_set:
        return ""
    shown = {d: _show(v) for d, v in per_set.items()}
    if len(set(shown.values())) == 1:  # the same for every data set that has it
        return f" (default: {next(iter(shown.values()))})"
    return " (default: " + ", ".join(f"{d} {v}" for d, v in shown.items()) + ")"


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per field of :class:`Config` (``--meta-batch`` for ``meta_batch``), in groups,
    each defaulting to ``None`` (not given; see :func:`given`). Returns the groups by name,
    for a program's own flags."""
    types = field_types()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if not meta["flag"]:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        (tp,) = [t for t in _options(types[f.name]) if t is not type(None)]
        kwargs: dict = {"dest": f.name, "default": None,
                        "help": meta["help"] + (_default_text(f) or _dataset_defaults_text(f.name))}
        if tp is bool:
            kwargs["action"] = "store_true"
        else:
            if typing.get_origin(tp) is list:
                tp, kwargs["nargs"] = typing.get_args(tp)[0], meta["nargs"] or "+"
            kwargs.update(type=tp, choices=meta["choices"], metavar=None if meta["choices"] else meta["metavar"])
        groups[meta["group"]].add_argument(flag(f.name), **kwargs)
    return groups


def given(args: argparse.Namespace) -> dict:
    """The settings given on the command line (the flags of :func:`add_arguments` that were used)."""
    names = {f.name for f in dataclasses.fields(Config) if f.metadata["flag"]}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
