"""Meta-training: ``python -m fastlaplace.train`` (Algorithm 2 of Grant et al. 2018).

With no arguments it meta-trains LLAMA on sinusoid regression, then reports the test MSE
over 600 new tasks after 1 and 10 inner steps. Every run writes to its output folder:
``config.json``, ``metrics.jsonl`` (one line per logged iteration), ``checkpoint.pt``
(written atomically with a checksum, the previous one kept as ``checkpoint.prev.pt``;
``--resume`` continues from it and ends with the same result as an uninterrupted run with
the same seed) and ``results.json``; and TensorBoard event files when ``tensorboard`` is
installed. A checkpoint is only written when the parameters, gradients and optimiser state
are all finite. ``--resume`` takes the run's settings from its folder; the learning rates,
the number of iterations, the device and the logging cadence may be changed (the change is
logged), anything that would change the problem is refused.

``torchrun --nproc_per_node N -m fastlaplace.train ...`` splits each meta-batch over N
processes (Gloo on the CPU, NCCL on CUDA; see :mod:`fastlaplace.distributed` and the README's
"Multi-GPU and multi-node"): rank 0 alone writes the files above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .cli import EXPECTED, UsageError, check_device, check_seed, errors_as_messages, positive_float, positive_int
from .data.sinusoid import SinusoidTasks
from .evaluate import evaluate
from .meta import LLAMA, MAML
from .problems import SinusoidProblem
from .progress import Progress
from .runs import CheckpointError, atomic_write, read_checkpoint, read_latest, save_checkpoint

METHODS = ("maml", "fomaml", "llama")
DATASETS = ("sinusoid", "digits", "omniglot", "miniimagenet")
MODELS = ("mlp", "conv4", "resnet12")  # mlp: sinusoid only; conv4, resnet12: image data sets

# Each data set's defaults: the paper's (miniImageNet), Finn et al.'s (Omniglot), ours (digits).
DATASET_DEFAULTS: dict[str, dict] = {
    "sinusoid": dict(iterations=10000, meta_batch=25, meta_lr=1e-3, inner_lr=0.01, inner_steps=1,
                     test_inner_steps=[1, 10], eta=1e-6, tau=1e-3, model="mlp"),
    "miniimagenet": dict(iterations=60000, meta_batch=4, meta_lr=1e-3, inner_lr=0.01, inner_steps=5,
                         test_inner_steps=[10], ways=5, shots=1, query=15, eta=1e-6, tau=1e-3, filters=64,
                         model="conv4"),
    "omniglot": dict(iterations=60000, meta_batch=32, meta_lr=1e-3, inner_lr=0.4, inner_steps=1,
                     test_inner_steps=[3], ways=5, shots=1, query=1, eta=1e-6, tau=1e-3, filters=64,
                     model="conv4"),
    "digits": dict(iterations=1000, meta_batch=4, meta_lr=1e-3, inner_lr=0.1, inner_steps=3,
                   test_inner_steps=[5], ways=5, shots=1, query=5, eta=1e-6, tau=1e-3, filters=32,
                   model="conv4"),
}


@dataclass
class Config:
    """Every setting of a run; ``None`` means the data set's default (DATASET_DEFAULTS)."""

    dataset: str = "sinusoid"
    method: str = "llama"
    iterations: int | None = None
    meta_batch: int | None = None
    meta_lr: float | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    test_inner_steps: list[int] | None = None
    eta: float | None = None
    tau: float | None = None
    logdet_method: str = "factored"
    fisher: str = "auto"
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    eval_tasks: int = 600
    eval_seed: int = 1_000_003
    # sinusoid
    x_range: list[float] = field(default_factory=lambda: [-10.0, 10.0])
    support: int = 10
    query_points: int = 10
    # images
    data_root: str | None = None
    ways: int | None = None
    shots: int | None = None
    query: int | None = None
    filters: int | None = None
    model: str | None = None  # conv4 or resnet12 (images); mlp (sinusoid)
    allow_pickle: bool = False  # read pickled data sets (they can run code: only trusted files)

    def resolved(self) -> "Config":
        if self.dataset not in DATASETS:
            raise UsageError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise UsageError(f"method must be one of {METHODS}, got {self.method!r}")
        values = dataclasses.asdict(self)
        for key, default in DATASET_DEFAULTS[self.dataset].items():
            if values.get(key) is None:
                values[key] = default
        cfg = Config(**values)
        if cfg.out is None:
            cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.method}-seed{cfg.seed}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_types(dataclasses.asdict(self), "the configuration")
        for name in ("iterations", "meta_batch", "inner_steps", "checkpoint_every", "log_every", "eval_tasks",
                     "support", "query_points"):
            positive_int(name, getattr(self, name))
        for name in ("meta_lr", "inner_lr", "tau"):
            positive_float(name, getattr(self, name))
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise UsageError(f"eta must be >= 0, got {self.eta!r}")
        if not self.test_inner_steps or any(s < 0 for s in self.test_inner_steps):
            raise UsageError(f"test_inner_steps must be integers >= 0, got {self.test_inner_steps!r}")
        choices = {"dataset": DATASETS, "method": METHODS, "logdet_method": ("factored", "exact"),
                   "fisher": ("auto", "gauss_newton", "sampled", "empirical"), "model": MODELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        lo_hi = self.x_range
        if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or not lo_hi[0] < lo_hi[1]:
            raise UsageError(f"x_range must be two finite numbers LO < HI, got {lo_hi!r}")
        check_device(self.device)
        check_seed("seed", self.seed)
        check_seed("eval_seed", self.eval_seed)
        if (self.model == "mlp") != (self.dataset == "sinusoid"):
            raise UsageError(f"model {self.model!r} is not for {self.dataset}: use "
                             + ("mlp" if self.dataset == "sinusoid" else "conv4 or resnet12"))
        if self.dataset != "sinusoid":
            positive_int("ways", self.ways, 2)
            positive_int("shots", self.shots)
            positive_int("query", self.query)
            positive_int("filters", self.filters)
        if self.dataset in ("omniglot", "miniimagenet") and not self.data_root:
            raise UsageError(f"--data-root is required for {self.dataset} (see README: Data)")


# Settings a resumed run may change: they do not change the problem being learnt.
RESUMABLE_CHANGES = ("meta_lr", "inner_lr", "iterations", "device", "checkpoint_every", "log_every", "eval_tasks",
                     "out", "data_root", "allow_pickle")
# Settings that locate or unlock data: never taken from a saved run, only from the user (nor
# is the output folder: a resumed run writes where its config.json was found).
USER_ONLY = ("data_root", "allow_pickle")

_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null",
          "list[int]": "a list of integers", "list[float]": "a list of numbers"}


def check_types(values: dict, source: str) -> None:
    """Refuse unknown settings and values of the wrong type (from a file or a checkpoint)."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{source}: unknown settings {unknown}")
    for name, value in values.items():
        ok, options = False, [t.strip() for t in str(fields[name]).split("|")]
        for option in options:
            if option.startswith("list["):
                inner = _TYPES[option[5:-1]]
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, inner) and not isinstance(v, bool) for v in value)
            else:
                ok = isinstance(value, _TYPES[option]) and (option == "bool" or not isinstance(value, bool))
            if ok:
                break
        if not ok:
            raise UsageError(f"{source}: {name} must be {' or '.join(_NAMES[o] for o in options)}, got {value!r}")


def config_from_dict(values, source: str) -> Config:
    if not isinstance(values, dict):
        raise UsageError(f"{source} must be a JSON object of settings, got {type(values).__name__}")
    check_types(values, source)
    if "model" not in values and values.get("dataset", "sinusoid") in DATASET_DEFAULTS:
        # saved before the model was a setting: the data set's default network was used
        values = {**values, "model": DATASET_DEFAULTS[values.get("dataset", "sinusoid")]["model"]}
    return Config(**values)


def make_problem(cfg: Config):
    if cfg.dataset == "sinusoid":
        tasks = SinusoidTasks(x_range=tuple(cfg.x_range), support=cfg.support, query=cfg.query_points)
        return SinusoidProblem(tasks)
    from .data.loaders import image_problem  # noqa: PLC0415 (image readers are only needed here)

    return image_problem(cfg.dataset, cfg.data_root, cfg.ways, cfg.shots, cfg.query, cfg.filters, cfg.seed,
                         allow_pickle=cfg.allow_pickle, model=cfg.model)


def make_learner(cfg: Config, model: torch.nn.Module) -> MAML:
    common = dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                  loss="mse" if cfg.dataset == "sinusoid" else "cross_entropy")
    if cfg.method == "llama":
        return LLAMA(model, eta=cfg.eta, tau=cfg.tau, logdet_method=cfg.logdet_method, fisher=cfg.fisher, **common)
    return MAML(model, first_order=cfg.method == "fomaml", **common)


def build(cfg: Config, device: str | None = None):
    """The problem and a freshly initialised learner (seeded, without touching global RNG),
    on ``device`` (default: the configured one)."""
    problem = make_problem(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = problem.build_model()
    return problem, make_learner(cfg, model).to(device or cfg.device)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between iterations, so a stop never
    leaves a half-applied optimiser step in a checkpoint."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only go there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: stop at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, resume: bool = False, progress: bool = True, evaluate_at_end: bool = True) -> dict:
    """Meta-train as configured; returns the final results (also written to results.json).

    Under ``torchrun`` (``WORLD_SIZE`` > 1, see :mod:`fastlaplace.distributed`) every rank
    runs this: each samples and differentiates its share of the meta-batch, the meta-gradients
    are averaged, rank 0 alone writes files, and the evaluation's tasks are split over the ranks.
    """
    cfg = cfg.resolved()
    ctx = distributed.from_env()
    if not resume:  # before joining the others (a resumed run's settings come from rank 0: checked then)
        distributed.local_tasks(cfg.meta_batch, ctx.world_size)
    owned = ctx.distributed and not distributed._initialized()
    ctx = distributed.init(cfg.device)
    # On an error the process group is left to the process's end: other ranks may still be
    # in a collective, and torchrun ends them.
    result = _train(cfg, ctx, resume, progress, evaluate_at_end)
    if owned:
        distributed.shutdown()
    return result


def _train(cfg: Config, ctx: distributed.Context, resume: bool, progress: bool, evaluate_at_end: bool) -> dict:
    if ctx.distributed:  # rank 0's settings (its --resume read them from its output folder)
        cfg = distributed.broadcast_object(cfg)
    local_batch = distributed.local_tasks(cfg.meta_batch, ctx.world_size)
    device = distributed.local_device(cfg.device, ctx)
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"

    def prepare():  # rank 0: the output folder and the checkpoint to continue from
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (ckpt_path.exists() or (out / "checkpoint.prev.pt").exists()):
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        latest = read_latest(ckpt_path, log=lambda m: print(m, file=sys.stderr)) if resume else None
        if latest is not None:
            state, used = latest
            if used != ckpt_path and ckpt_path.exists():  # keep the damaged file aside, out of the rotation
                os.replace(ckpt_path, ckpt_path.with_name(ckpt_path.name + ".corrupt"))
            saved = config_from_dict(state["config"], f"the configuration in {used}")
            changed = [f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_CHANGES
                       and getattr(saved, f.name) != getattr(cfg, f.name)]
            if changed:
                raise UsageError(f"{used} was written with other settings of {', '.join(changed)} ("
                                 + ", ".join(f"{k}: saved {getattr(saved, k)!r}, now {getattr(cfg, k)!r}"
                                             for k in changed)
                                 + f"); a resumed run may only change {', '.join(RESUMABLE_CHANGES[:7])}: "
                                 "use a new --out for a different run")
            return state, used, saved
        return None

    if not ctx.distributed:
        latest = prepare()
    else:  # rank 0 decides; its outcome (or its error) reaches every rank
        outcome = None
        if ctx.is_main:
            try:
                outcome = ("ok", prepare())
            except EXPECTED as exc:
                outcome = ("error", exc)
        outcome = distributed.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        latest = outcome[1]
    problem, learner = build(cfg, device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)
    task_gen, fisher_gen = _generators(cfg, ctx, device)
    start, good = 0, None  # good: the last checkpoint known to be intact, and its iteration
    if latest is not None:
        state, used, saved = latest
        try:
            learner.load_state_dict(state["learner"])
            optimizer.load_state_dict(state["optimizer"])
            saved_world = state.get("world_size", 1)
            if saved_world == ctx.world_size == 1:
                task_gen.set_state(state["task_generator"])
                fisher_gen.set_state(state["fisher_generator"].to(fisher_gen.get_state().device))
            elif saved_world == ctx.world_size:
                task_gen.set_state(state["task_generators"][ctx.rank].clone())
                fisher_gen.set_state(state["fisher_generators"][ctx.rank].clone().to(fisher_gen.get_state().device))
            else:  # another number of ranks: new task streams, seeded from (seed, rank, iteration)
                task_gen, fisher_gen = _generators(cfg, ctx, device, iteration=state["iteration"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"{used} does not fit this run ({_brief(exc)})") from exc
        for group in optimizer.param_groups:
            group["lr"] = cfg.meta_lr
        start, good = state["iteration"], (used, state["iteration"])
        if ctx.is_main:
            print(f"resumed from {used} at iteration {start}", file=sys.stderr)
            if saved_world != ctx.world_size:
                print(f"resumed with {ctx.world_size} process(es) a run saved by {saved_world}: each rank's task "
                      f"and Fisher generators are seeded anew from (seed, rank, iteration {start}), so the rest of "
                      "the run is statistically, not bitwise, the same as an uninterrupted one", file=sys.stderr)
            for k in ("meta_lr", "inner_lr", "iterations"):
                if getattr(saved, k) != getattr(cfg, k):
                    print(f"resumed with {k} changed from {getattr(saved, k)} to {getattr(cfg, k)}", file=sys.stderr)
    elif resume and ctx.is_main:
        print(f"no checkpoint in {out} yet: starting from iteration 0", file=sys.stderr)
    writer = None
    if ctx.is_main:
        _truncate_metrics(metrics_path, start)  # lines after the checkpoint are logged again
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(dataclasses.asdict(cfg), indent=2).encode()))
        writer = _tensorboard(out)

    def diverged(what: str, iteration: int) -> FloatingPointError:
        if good is None:
            advice = "no checkpoint was written yet: start again with a smaller --meta-lr or --inner-lr"
        else:
            advice = (f"the last good checkpoint is {good[0]} (iteration {good[1]}); continue from it with a "
                      f"smaller learning rate, e.g. python -m fastlaplace.train --resume --out {cfg.out} "
                      f"--meta-lr {cfg.meta_lr / 10:g}")
        return FloatingPointError(f"{what} at iteration {iteration}; {advice}")

    def save(iteration: int) -> None:
        nonlocal good
        tensors = [*learner.parameters(), *_tensors(optimizer.state_dict()["state"])]
        if not _all_finite(tensors):  # the same on every rank: the parameters are the same
            raise diverged("the parameters or the optimiser state became non-finite (not saved)", iteration)
        if ctx.distributed:
            task_states = distributed.all_gather_rows(task_gen.get_state())
            fisher_states = distributed.all_gather_rows(fisher_gen.get_state().cpu())
        if ctx.is_main:
            state = dict(config=dataclasses.asdict(cfg), iteration=iteration, learner=learner.state_dict(),
                         optimizer=optimizer.state_dict(), task_generator=task_gen.get_state(),
                         fisher_generator=fisher_gen.get_state().cpu())
            if ctx.distributed:
                state.update(world_size=ctx.world_size, task_generators=task_states, fisher_generators=fisher_states)
            save_checkpoint(ckpt_path, state)
        good = (ckpt_path, iteration)

    running, t0 = None, time.perf_counter()
    metrics_file = open(metrics_path, "a") if ctx.is_main else contextlib.nullcontext()
    with _StopFlag() as stop, Progress(cfg.iterations, f"{cfg.method} {cfg.dataset}", start=start,
                                       enabled=progress and ctx.is_main) as bar, metrics_file as metrics:
        for it in range(start, cfg.iterations):
            batch = problem.sample("train", local_batch, task_gen).to(device)
            parts = learner.meta_objective(*batch, generator=fisher_gen)
            summary = torch.stack([parts.loss.detach(), parts.query_loss.detach().mean(),
                                   parts.loss.new_zeros(()) if parts.logdet is None else parts.logdet.detach().mean()])
            if not ctx.distributed:
                loss, query_loss, logdet = summary.tolist()  # one host sync for the loss check and the log
                if not math.isfinite(loss):
                    raise diverged(f"the meta-loss became {loss}", it + 1)
                optimizer.zero_grad(set_to_none=True)
                parts.loss.backward()
                stopping = stop.stop
            else:  # the losses and the stop flag travel with the meta-gradients: every rank decides alike
                optimizer.zero_grad(set_to_none=True)
                parts.loss.backward()
                extras = torch.cat([summary, summary.new_zeros(1) + float(stop.stop)]).double()
                loss, query_loss, logdet, stopped = distributed.average_gradients(learner.parameters(),
                                                                                  extras).tolist()
                stopping = stopped > 0
                if not math.isfinite(loss):
                    raise diverged(f"the meta-loss became {loss}", it + 1)
            logdet = None if parts.logdet is None else logdet
            if not _all_finite([p.grad for p in learner.parameters() if p.grad is not None]):
                raise diverged("the meta-gradient became non-finite (not applied)", it + 1)
            optimizer.step()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update(1, loss=running)
            if ctx.is_main and ((it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations):
                row = dict(iteration=it + 1, loss=loss, query_loss=query_loss, seconds=time.perf_counter() - t0)
                if logdet is not None:
                    row["logdet"] = logdet
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if writer is not None:
                    for k, v in row.items():
                        if k != "iteration":
                            writer.add_scalar(f"train/{k}", v, it + 1)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations or stopping:
                save(it + 1)
            if stopping:
                if ctx.is_main:
                    print(f"\nstopped at iteration {it + 1}; checkpoint saved. Continue with --resume "
                          f"--out {cfg.out}", file=sys.stderr)
                return {"stopped_at": it + 1}
    if cfg.iterations <= start:  # nothing left to train (resumed a finished run)
        save(start)
    if not evaluate_at_end:
        return {}
    results = evaluate(learner, problem, cfg.test_inner_steps, cfg.eval_tasks, cfg.eval_seed,
                       device=device, progress=progress and ctx.is_main, distributed=ctx.distributed)
    summary = {
        "dataset": cfg.dataset, "method": cfg.method, "iterations": cfg.iterations, "metric": problem.metric_name,
        "test": {str(s): vars(e) for s, e in results.items()},
    }
    if ctx.is_main:
        atomic_write(out / "results.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        for s, est in results.items():
            print(f"test {problem.metric_name} after {s} inner step(s): {est}  (mean ± 95% CI, {est.n} tasks)")
    if writer is not None:
        writer.close()
    return summary


def _generators(cfg: Config, ctx: distributed.Context, device: str, iteration: int = 0):
    """The task and Fisher-label generators of this rank: seeded by ``seed`` and ``seed + 1``
    in a one-process run (started at iteration 0), else from (seed, rank, iteration)."""
    if ctx.world_size == 1 and iteration == 0:
        return torch.Generator().manual_seed(cfg.seed), torch.Generator(device=device).manual_seed(cfg.seed + 1)
    return (torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, ctx.rank, iteration, "tasks")),
            torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed, ctx.rank, iteration, "fisher")))


def _brief(exc: BaseException) -> str:
    """An exception's message on one line (state-dict errors span several)."""
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One synchronisation per device (Adam keeps its step counts on the CPU)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash (or otherwise unreadable) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
    return rows


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop lines logged after the checkpoint (all of them when there is none yet), which the
    run will log again, and any partial line."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["iteration"] <= iteration]
    atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in keep).encode()))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def load_for_evaluation(checkpoint: str, device: str | None = None, data_root: str | None = None,
                        allow_pickle: bool = False):
    """(learner, problem, config) from a checkpoint written by :func:`train`.

    The data folder of an image data set is ``data_root``, never the one the checkpoint
    names: a checkpoint may come from elsewhere, and reading data can mean reading what an
    attacker put there."""
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], f"the configuration in {checkpoint}")
    if device:
        cfg.device = device
    else:
        try:
            check_device(cfg.device)
        except UsageError as exc:
            raise UsageError(f"{checkpoint} was trained on {cfg.device!r} ({exc}): pass --device cpu") from exc
    if cfg.dataset in ("omniglot", "miniimagenet"):
        if not data_root:
            raise UsageError(f"{checkpoint} is a {cfg.dataset} run: pass --data-root with the folder of its data "
                             f"(the folder the checkpoint names, {cfg.data_root!r}, is only used when you pass it)")
    cfg.data_root, cfg.allow_pickle = data_root, allow_pickle
    cfg.validate()
    problem, learner = build(cfg)
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint} does not fit its own configuration ({_brief(exc)})") from exc
    return learner.to(cfg.device), problem, cfg


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a JSON file of settings (command-line options override it)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--method", choices=METHODS, help="maml, fomaml (first-order MAML) or llama")
    p.add_argument("--iterations", type=int)
    p.add_argument("--meta-batch", type=int, help="tasks per meta-batch")
    p.add_argument("--meta-lr", type=float, help="β, Adam's step size")
    p.add_argument("--inner-lr", type=float, help="α")
    p.add_argument("--inner-steps", type=int, help="K during meta-training")
    p.add_argument("--test-inner-steps", type=int, nargs="+", help="inner steps at evaluation")
    p.add_argument("--eta", type=float, help="LLAMA's weight of log det Ĥ")
    p.add_argument("--tau", type=float, help="LLAMA's prior precision")
    p.add_argument("--logdet-method", choices=("factored", "exact"))
    p.add_argument("--fisher", choices=("auto", "gauss_newton", "sampled", "empirical"))
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--out", help="output folder (default runs/DATASET-METHOD-seedN)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with the run's settings (options given override them)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-tasks", type=int, help="test tasks (default 600)")
    p.add_argument("--x-range", type=float, nargs=2, help="sinusoid input range (default -10 10)")
    p.add_argument("--support", type=int, help="sinusoid support points")
    p.add_argument("--query-points", type=int, help="sinusoid query points")
    p.add_argument("--data-root", help="folder of the image data set (see README: Data)")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="read miniImageNet's pickle files (loading a pickle can run code: only files you trust)")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--query", type=int, help="query images per class")
    p.add_argument("--filters", type=int, help="Conv4 filters (32 or 64); ResNet-12: the first block's width F "
                   "(widths F, 2.5F, 5F, 10F; 64 gives 64-160-320-640)")
    p.add_argument("--model", choices=MODELS, help="network for images: conv4 (default) or resnet12; mlp for sinusoid")
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    config_file, resume, no_progress = args.pop("config"), args.pop("resume"), args.pop("no_progress")
    values = _read_json(Path(config_file), "settings") if config_file else {}
    check_types(values, str(config_file))
    values.update({k: v for k, v in args.items() if v is not None})
    if resume:  # the run's own settings, under those given now
        out = Path(values.get("out") or Config(**values).resolved().out)
        if (out / "config.json").exists():
            saved = _read_json(out / "config.json", "settings")
            check_types(saved, str(out / "config.json"))
            values = {**{k: v for k, v in saved.items() if k not in USER_ONLY}, **values, "out": str(out)}
    return Config(**values), resume, not no_progress


def _read_json(path: Path, what: str) -> dict:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"no file {path}") from exc
    except ValueError as exc:  # also a file that is not UTF-8
        raise UsageError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a JSON object of {what}, got {type(values).__name__}")
    return values


def main(argv: list[str] | None = None) -> dict:
    with errors_as_messages():
        cfg, resume, progress = parse_args(argv)
        return train(cfg, resume=resume, progress=progress)


if __name__ == "__main__":
    main()
