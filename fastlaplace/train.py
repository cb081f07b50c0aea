"""Meta-training: ``python -m fastlaplace.train`` (Algorithm 2 of Grant et al. 2018).

With no arguments it meta-trains LLAMA on sinusoid regression, then reports the test MSE
over 600 new tasks after 1 and 10 inner steps. Every run writes to its output folder:
``config.json``, ``metrics.jsonl`` (one line per logged iteration), ``checkpoint.pt``
(written atomically; ``--resume`` continues from it and ends with the same result as an
uninterrupted run with the same seed) and ``results.json``; and TensorBoard event files
when ``tensorboard`` is installed.
"""

from __future__ import annotations

import argparse
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

from .data.sinusoid import SinusoidTasks
from .evaluate import Estimate, evaluate
from .meta import LLAMA, MAML
from .problems import SinusoidProblem
from .progress import Progress

METHODS = ("maml", "fomaml", "llama")
DATASETS = ("sinusoid", "digits", "omniglot", "miniimagenet")

# Each data set's defaults: the paper's (miniImageNet), Finn et al.'s (Omniglot), ours (digits).
DATASET_DEFAULTS: dict[str, dict] = {
    "sinusoid": dict(iterations=10000, meta_batch=25, meta_lr=1e-3, inner_lr=0.01, inner_steps=1,
                     test_inner_steps=[1, 10], eta=1e-6, tau=1e-3),
    "miniimagenet": dict(iterations=60000, meta_batch=4, meta_lr=1e-3, inner_lr=0.01, inner_steps=5,
                         test_inner_steps=[10], ways=5, shots=1, query=15, eta=1e-6, tau=1e-3, filters=32),
    "omniglot": dict(iterations=60000, meta_batch=32, meta_lr=1e-3, inner_lr=0.4, inner_steps=1,
                     test_inner_steps=[3], ways=5, shots=1, query=1, eta=1e-6, tau=1e-3, filters=64),
    "digits": dict(iterations=1000, meta_batch=4, meta_lr=1e-3, inner_lr=0.1, inner_steps=3,
                   test_inner_steps=[5], ways=5, shots=1, query=5, eta=1e-6, tau=1e-3, filters=32),
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

    def resolved(self) -> "Config":
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
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
        for name in ("iterations", "meta_batch", "inner_steps", "checkpoint_every", "log_every", "eval_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("meta_lr", "inner_lr", "tau"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if not self.test_inner_steps or any(s < 0 for s in self.test_inner_steps):
            raise ValueError(f"test_inner_steps must be integers >= 0, got {self.test_inner_steps!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        if self.dataset in ("omniglot", "miniimagenet") and not self.data_root:
            raise ValueError(f"--data-root is required for {self.dataset} (see README: Data)")


def make_problem(cfg: Config):
    if cfg.dataset == "sinusoid":
        tasks = SinusoidTasks(x_range=tuple(cfg.x_range), support=cfg.support, query=cfg.query_points)
        return SinusoidProblem(tasks)
    from .data.loaders import image_problem  # noqa: PLC0415 (image readers are only needed here)

    return image_problem(cfg.dataset, cfg.data_root, cfg.ways, cfg.shots, cfg.query, cfg.filters, cfg.seed)


def make_learner(cfg: Config, model: torch.nn.Module) -> MAML:
    common = dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                  loss="mse" if cfg.dataset == "sinusoid" else "cross_entropy")
    if cfg.method == "llama":
        return LLAMA(model, eta=cfg.eta, tau=cfg.tau, logdet_method=cfg.logdet_method, fisher=cfg.fisher, **common)
    return MAML(model, first_order=cfg.method == "fomaml", **common)


def build(cfg: Config):
    """The problem and a freshly initialised learner (seeded, without touching global RNG)."""
    problem = make_problem(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = problem.build_model()
    return problem, make_learner(cfg, model).to(cfg.device)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """Meta-train as configured; returns the final results (also written to results.json)."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    problem, learner = build(cfg)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)
    task_gen = torch.Generator().manual_seed(cfg.seed)
    fisher_gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    start = 0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        saved = Config(**state["config"])
        # A resumed run may train longer, or move to another device; nothing else may change.
        if dataclasses.replace(saved, out=cfg.out, iterations=cfg.iterations, device=cfg.device) != cfg:
            raise ValueError(f"{ckpt_path} was written with another configuration; use a new --out "
                             f"or the same settings (saved: {saved})")
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        task_gen.set_state(state["task_generator"])
        fisher_gen.set_state(state["fisher_generator"].to(fisher_gen.get_state().device))
        start = state["iteration"]
        _truncate_metrics(metrics_path, start)
        print(f"resumed from {ckpt_path} at iteration {start}", file=sys.stderr)
    elif not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    writer = _tensorboard(out)

    def save(iteration: int) -> None:
        state = dict(config=dataclasses.asdict(cfg), iteration=iteration, learner=learner.state_dict(),
                     optimizer=optimizer.state_dict(), task_generator=task_gen.get_state(),
                     fisher_generator=fisher_gen.get_state().cpu())
        _atomic_write(ckpt_path, lambda f: torch.save(state, f))

    running, t0 = None, time.perf_counter()
    with _StopFlag() as stop, Progress(cfg.iterations, f"{cfg.method} {cfg.dataset}", start=start,
                                       enabled=progress) as bar, open(metrics_path, "a") as metrics:
        for it in range(start, cfg.iterations):
            batch = problem.sample("train", cfg.meta_batch, task_gen).to(cfg.device)
            parts = learner.meta_objective(*batch, generator=fisher_gen)
            if not bool(torch.isfinite(parts.loss)):
                raise FloatingPointError(
                    f"meta-loss became {float(parts.loss.detach())} at iteration {it + 1}; try a smaller --meta-lr or "
                    f"--inner-lr (last checkpoint: {ckpt_path if ckpt_path.exists() else 'none'})")
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            optimizer.step()
            loss = float(parts.loss.detach())
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update(1, loss=running)
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                row = dict(iteration=it + 1, loss=loss, query_loss=float(parts.query_loss.detach().mean()),
                           seconds=time.perf_counter() - t0)
                if parts.logdet is not None:
                    row["logdet"] = float(parts.logdet.detach().mean())
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if writer is not None:
                    for k, v in row.items():
                        if k != "iteration":
                            writer.add_scalar(f"train/{k}", v, it + 1)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations or stop.stop:
                save(it + 1)
            if stop.stop:
                print(f"\nstopped at iteration {it + 1}; checkpoint saved. Continue with --resume "
                      f"--out {cfg.out}", file=sys.stderr)
                return {"stopped_at": it + 1}
    if cfg.iterations == start:  # nothing left to train (resumed a finished run)
        save(start)
    if not evaluate_at_end:
        return {}
    results = evaluate(learner, problem, cfg.test_inner_steps, cfg.eval_tasks, cfg.eval_seed,
                       device=cfg.device, progress=progress)
    summary = {
        "dataset": cfg.dataset, "method": cfg.method, "iterations": cfg.iterations, "metric": problem.metric_name,
        "test": {str(s): vars(e) for s, e in results.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    for s, est in results.items():
        print(f"test {problem.metric_name} after {s} inner step(s): {est}  (mean ± 95% CI, {est.n} tasks)")
    if writer is not None:
        writer.close()
    return summary


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop lines logged after the checkpoint that a resumed run will log again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    _atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def load_for_evaluation(checkpoint: str, device: str | None = None, data_root: str | None = None):
    """(learner, problem, config) from a checkpoint written by :func:`train`."""
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = Config(**state["config"])
    if device:
        cfg.device = device
    if data_root:
        cfg.data_root = data_root
    problem, learner = build(cfg)
    learner.load_state_dict(state["learner"])
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
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-tasks", type=int, help="test tasks (default 600)")
    p.add_argument("--x-range", type=float, nargs=2, help="sinusoid input range (default -10 10)")
    p.add_argument("--support", type=int, help="sinusoid support points")
    p.add_argument("--query-points", type=int, help="sinusoid query points")
    p.add_argument("--data-root", help="folder of the image data set (see README: Data)")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--query", type=int, help="query images per class")
    p.add_argument("--filters", type=int, help="Conv4 filters (32 or 64)")
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    values = {}
    if args.pop("config"):
        with open(args_config := p.parse_args(argv).config) as f:
            values = json.load(f)
        unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise SystemExit(f"{args_config}: unknown settings {sorted(unknown)}")
    resume, no_progress = args.pop("resume"), args.pop("no_progress")
    values.update({k: v for k, v in args.items() if v is not None})
    return Config(**values), resume, not no_progress


def main(argv: list[str] | None = None) -> dict:
    cfg, resume, progress = parse_args(argv)
    try:
        return train(cfg, resume=resume, progress=progress)
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
