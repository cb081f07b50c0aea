"""Meta-training: ``python -m fastlaplace.train`` (Algorithm 2 of Grant et al. 2018).

With no arguments it meta-trains LLAMA on sinusoid regression, then reports the test MSE
over 600 new tasks after 1 and 10 inner steps. Every run writes to its output folder:
``config.json``, ``metrics.jsonl`` (one line per logged iteration), ``checkpoint.pt``
(written atomically with a checksum, the previous one kept as ``checkpoint.prev.pt``;
``--resume`` continues from it and ends with the same result as an uninterrupted run with
the same seed), ``results.json``, ``conv_strategy.json`` for a network with adapted
convolutions (what ``--conv-strategy`` ran for each; ``auto``'s choices also printed once); and TensorBoard
event files when ``tensorboard`` is installed. A checkpoint is only written when the
parameters, gradients and optimiser state are all finite. ``--resume`` takes the run's
settings from its folder; the learning rates, the number of iterations, the device, the
convolution strategy and the logging cadence may be changed (the change is logged),
anything that would change the problem is refused, and fewer iterations than done are
refused (nothing is written). A new run refuses a folder holding a checkpoint, or another
run's results, metrics or settings unless ``--overwrite``.

``torchrun --nproc_per_node N -m fastlaplace.train ...`` splits each meta-batch over N
processes (Gloo on the CPU, NCCL on CUDA; see :mod:`fastlaplace.distributed` and docs/guide.md,
"Multi-GPU and multi-node"): rank 0 alone writes the files above.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import distributed, graphs
from .cli import EXPECTED, UsageError, check_memory, errors_as_messages, one_line
from .config import (
    Config,
    add_arguments,
    check_resumable,
    config_from_dict,
    given,
    resumed_changes,
)
from .datasets import DATASETS
from .evaluate import evaluate, evaluation_group
from .progress import progress_bar
from .runs import (
    BEST,
    CHECKPOINT,
    CONV_STRATEGY,
    METRICS,
    RESULTS,
    SETTINGS,
    TENSORBOARD,
    CheckpointError,
    build,
    lock_output,
    named_tensors,
    open_output,
    read_checkpoint,
    restore_best,
    save_checkpoint,
    settings,
    truncate_metrics,
    write_json,
)


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
    with distributed.session(cfg.device) as ctx:
        if ctx.distributed:  # rank 0's settings (its --resume read them from its output folder)
            cfg = distributed.broadcast_object(cfg)
        with Trainer.restore_or_start(cfg, ctx, resume) as trainer:
            stopped_at = trainer.run(progress)
            return {"stopped_at": stopped_at} if stopped_at is not None else trainer.finish(evaluate_at_end, progress)


class Step(NamedTuple):
    """One meta-iteration's losses (averaged over the ranks) and whether to stop after it."""

    loss: float | None  # None: not read from the device at this iteration (--cuda-graph)
    query_loss: float | None
    logdet: float | None  # LLAMA's mean log det Ĥ
    stopping: bool


class Trainer:
    """One rank's meta-training: :meth:`restore_or_start`, then :meth:`run` (:meth:`step`,
    :meth:`log` and :meth:`save` per iteration), then :meth:`finish`."""

    def __init__(self, cfg: Config, ctx: distributed.Context):
        self.cfg, self.ctx = cfg, ctx
        self.local_batch = distributed.local_tasks(cfg.meta_batch, ctx.world_size)
        self.device = distributed.local_device(cfg.device, ctx)
        self.out = Path(cfg.out)
        self.problem, self.learner = build(cfg, self.device)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=cfg.meta_lr)
        self.task_gen, self.fisher_gen = _generators(cfg, ctx, self.device)
        self.iteration = 0  # meta-iterations done
        self.good: tuple[Path, int] | None = None  # the last checkpoint known to be intact, and its iteration
        self.saved_at: int | None = None  # the iteration this process last saved
        self.writer = None  # TensorBoard's, on rank 0 when tensorboard is installed
        self.lock = None  # rank 0: the run folder's lock (runs.lock_output)
        self.conv_choices: dict = {}  # the convolutions' strategies last recorded
        self.best: tuple[int, float, int] | None = None  # --val-every: best.pt's (iteration, figure, diverged tasks)
        self.graph: graphs.GraphStep | None = None  # --cuda-graph: captured at the first step
        if cfg.cuda_graph and ctx.distributed:
            raise UsageError("--cuda-graph runs in one process: leave it out under torchrun")

    # ------------------------------------------------------------------------ restore or start
    @classmethod
    def restore_or_start(cls, cfg: Config, ctx: distributed.Context, resume: bool) -> Trainer:
        """Rank 0 opens the output folder and reads the checkpoint to continue from (with
        ``resume``); every rank builds the problem and the learner and restores the saved
        state, its own generators included; rank 0 writes config.json and opens the logs."""
        local = distributed.local_tasks(cfg.meta_batch, ctx.world_size)  # before touching the folder

        def accept(state: dict, used: Path) -> None:
            """Refuse to resume (before the folder changes) another problem or fewer iterations than done."""
            check_resumable(config_from_dict(state["config"], f"the configuration in {used}"), cfg, str(used))
            if state["iteration"] > cfg.iterations:
                raise UsageError(f"{used} is at iteration {state['iteration']}, past --iterations {cfg.iterations}: "
                                 "a resumed run only goes forward (evaluate this one with python -m "
                                 f"fastlaplace.evaluate {used})")

        def open_run():
            if DATASETS[cfg.dataset].data_root and Path(cfg.out).resolve() == Path(cfg.data_root).resolve():
                # A run's folder of its own (a subfolder of the data is fine: no file names are shared).
                raise UsageError(f"--out {cfg.out!r} is the data folder --data-root: choose a folder for the run")
            trainer.lock = lock_output(Path(cfg.out))  # until the run ends: one process per folder
            latest = open_output(Path(cfg.out), resume, cfg.overwrite, accept)
            if latest is None:
                return None
            state, used = latest
            return state, used, config_from_dict(state["config"], f"the configuration in {used}")

        # the data is read (a bad data folder fails here) and the sizes checked before the folder changes
        trainer = cls(cfg, ctx)
        _check_memory(cfg, local, trainer.device)
        try:
            return trainer._open(open_run, resume)
        except BaseException:
            trainer.__exit__()
            raise

    def _open(self, open_run, resume: bool) -> Trainer:
        """:meth:`restore_or_start` once the trainer is built: the folder, the state, the logs."""
        cfg, ctx = self.cfg, self.ctx
        latest = distributed.on_main_rank(open_run, ctx, EXPECTED)  # rank 0's outcome (or error) on every rank
        if resume:  # best.pt as of the checkpoint (none yet: iteration 0), refused before "resumed from" is said
            start = latest[0]["iteration"] if latest is not None else 0
            self.best = distributed.on_main_rank(
                lambda: restore_best(self.out, start, self.validation_tasks() if cfg.val_every else None,
                                     log=lambda m: print(m, file=sys.stderr)), ctx, EXPECTED)
        if latest is not None:
            self._restore(*latest)
        elif resume and ctx.is_main:
            print(f"no checkpoint in {self.out} yet: starting from iteration 0", file=sys.stderr)
        if ctx.is_main:
            # lines after the checkpoint are logged again (and its validation, see run)
            truncate_metrics(self.out / METRICS, self.iteration, self.validates_at_start)
            write_json(self.out / SETTINGS, dataclasses.asdict(cfg))
            self.writer = _tensorboard(self.out)
        return self

    def _restore(self, state: dict, used: Path, saved: Config) -> None:
        cfg, ctx = self.cfg, self.ctx
        saved_world = state.get("world_size", 1)
        try:
            self.learner.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
            fisher_device = self.fisher_gen.get_state().device
            if saved_world == ctx.world_size == 1:
                self.task_gen.set_state(state["task_generator"])
                self.fisher_gen.set_state(state["fisher_generator"].to(fisher_device))
            elif saved_world == ctx.world_size:
                self.task_gen.set_state(state["task_generators"][ctx.rank].clone())
                self.fisher_gen.set_state(state["fisher_generators"][ctx.rank].clone().to(fisher_device))
            else:  # another number of ranks: new task streams, seeded from (seed, rank, iteration)
                self.task_gen, self.fisher_gen = _generators(cfg, ctx, self.device, iteration=state["iteration"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"{used} does not fit this run ({one_line(exc)})") from exc
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.meta_lr
        self.iteration = state["iteration"]
        self.good = (used, self.iteration)
        if used == self.out / CHECKPOINT:  # already saved: a finished run is not saved again (nor rotated)
            self.saved_at = self.iteration
        if ctx.is_main:
            print(f"resumed from {used} at iteration {self.iteration}", file=sys.stderr)
            if saved_world != ctx.world_size:
                print(f"resumed with {ctx.world_size} process(es) a run saved by {saved_world}: each rank's task "
                      f"and Fisher generators are seeded anew from (seed, rank, iteration {self.iteration}), so the "
                      "rest of the run is statistically, not bitwise, the same as an uninterrupted one",
                      file=sys.stderr)
            for name, before, now in resumed_changes(saved, cfg):
                print(f"resumed with {name} changed from {before} to {now}", file=sys.stderr)

    # ------------------------------------------------------------------------ iterations
    def run(self, progress: bool = True) -> int | None:
        """Meta-train from the restored iteration to the last, saving a checkpoint every
        ``checkpoint_every`` iterations. Ctrl-C or SIGTERM stops at the end of the current
        iteration, after a checkpoint: the iteration it stopped at is returned (else None)."""
        cfg, main = self.cfg, self.ctx.is_main
        running, t0 = None, time.perf_counter()
        metrics_file = open(self.out / METRICS, "a") if main else contextlib.nullcontext()
        with _StopFlag() as stop, metrics_file as metrics, progress_bar(
                cfg.iterations, f"{cfg.method} {cfg.dataset}", initial=self.iteration,
                enabled=progress and main) as bar:
            postfix = {}
            if self.validates_at_start:
                postfix.update(self.validate(self.iteration, metrics))
                bar.set_postfix(postfix)
            for iteration in range(self.iteration + 1, cfg.iterations + 1):
                step = self.step(iteration, stop)
                self.record_conv_choices()
                if step.loss is not None:
                    running = step.loss if running is None else 0.98 * running + 0.02 * step.loss
                    postfix["loss"] = running
                    bar.set_postfix(postfix, refresh=False)
                bar.update()
                self.log(iteration, step, metrics, time.perf_counter() - t0)
                if cfg.val_every and iteration % cfg.val_every == 0 and not step.stopping:
                    # before the checkpoint; a run stopped or killed in between validates it when resumed
                    postfix.update(self.validate(iteration, metrics))
                    bar.set_postfix(postfix)
                if iteration % cfg.checkpoint_every == 0 or step.stopping:
                    self.save(iteration)
                if step.stopping:
                    break
            else:
                return None
        if main:
            print(f"stopped at iteration {self.iteration}; checkpoint saved. Continue with --resume --out {cfg.out}",
                  file=sys.stderr)
        return self.iteration

    def step(self, iteration: int, stop: _StopFlag) -> Step:
        """One meta-iteration: this rank's share of a meta-batch, its meta-gradient averaged
        over the ranks (with the losses and the stop flag), checked, and Adam's step."""
        if self.cfg.cuda_graph:
            return self._graph_step(iteration, stop)
        batch = self.problem.sample("train", self.local_batch, self.task_gen).to(self.device)
        parts = self.learner.meta_objective(*batch, generator=self.fisher_gen)
        logdet = parts.loss.new_zeros(()) if parts.logdet is None else parts.logdet.detach().mean()
        summary = torch.stack([parts.loss.detach(), parts.query_loss.detach().mean(), logdet])
        self.optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        if self.ctx.distributed:  # the losses and the stop flag travel with the meta-gradients: all decide alike
            extras = torch.cat([summary, summary.new_zeros(1) + float(stop.stop)]).double()
            summary = distributed.average_gradients(self.learner.parameters(), extras)
        grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
        flags = torch.cat([summary.double(), graphs.any_nonfinite(grads).double()])
        # One host sync for the losses, the stop flag and the finite checks.
        loss, query_loss, mean_logdet, *rest, nonfinite = flags.tolist()
        stopping = rest[0] > 0 if self.ctx.distributed else stop.stop
        if not math.isfinite(loss):
            raise self._diverged(f"the meta-loss became {loss}", iteration)
        if nonfinite:
            raise self._diverged("the meta-gradient became non-finite (not applied)", iteration)
        self.optimizer.step()
        self.iteration = iteration
        return Step(loss, query_loss, None if parts.logdet is None else mean_logdet, stopping)

    def _graph_step(self, iteration: int, stop: _StopFlag) -> Step:
        """The step replayed as a CUDA graph (:mod:`fastlaplace.graphs`); the losses and the
        finite flag are read from the device only where they are needed: to log, to save, to
        stop and at the end."""
        batch = self.problem.sample("train", self.local_batch, self.task_gen)
        if self.graph is None:
            self.graph = graphs.GraphStep(self.learner, self.optimizer, self.fisher_gen, batch)
        self.graph.step(batch)
        cfg = self.cfg
        self.iteration = iteration
        if not (stop.stop or iteration == cfg.iterations or iteration % cfg.log_every == 0
                or iteration % cfg.checkpoint_every == 0):
            return Step(None, None, None, False)
        loss, query_loss, logdet, finite = self.graph.read()
        if not finite:
            raise self._diverged("the meta-loss or meta-gradient became non-finite (--cuda-graph reads them at "
                                 "each logged iteration)", iteration)
        return Step(loss, query_loss, logdet, stop.stop)

    def log(self, iteration: int, step: Step, metrics, seconds: float) -> None:
        """Rank 0, every ``log_every`` iterations and at the last: a line of metrics.jsonl and
        TensorBoard's scalars."""
        if not self.ctx.is_main or (iteration % self.cfg.log_every and iteration != self.cfg.iterations):
            return
        row = dict(iteration=iteration, loss=step.loss, query_loss=step.query_loss, seconds=seconds)
        if step.logdet is not None:
            row["logdet"] = step.logdet
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "iteration":
                    self.writer.add_scalar(f"train/{k}", v, iteration)

    @property
    def validates_at_start(self) -> bool:
        """``--val-every``: the iteration a run starts from is validated when it is a multiple of
        N: 0 (the initialisation may validate best; on digits it does), or a checkpoint whose
        validation a stop skipped or a kill cut short (done again: the same parameters)."""
        return bool(self.cfg.val_every) and self.iteration % self.cfg.val_every == 0

    def validation_tasks(self) -> dict:
        """What makes two validation figures comparable: the tasks, their seed, the inner steps."""
        return dict(tasks=self.cfg.val_tasks, seed=self.cfg.val_seed, steps=self.cfg.test_inner_steps[0])

    def validate(self, iteration: int, metrics) -> dict[str, float]:
        """``--val-every``: the metric on the run's ``--val-tasks`` validation tasks (the same
        tasks each time, split over the ranks), after the first of ``--test-inner-steps``; a
        line of metrics.jsonl, and best.pt when it is the best so far (rank 0 writes).
        Returns the figure for the progress bar."""
        cfg, problem, tasks = self.cfg, self.problem, self.validation_tasks()
        group = evaluation_group(cfg, tasks["tasks"], "--val-tasks", self.device)
        est = evaluate(self.learner, problem, [tasks["steps"]], tasks["tasks"], tasks["seed"], split="val",
                       device=self.device, progress=False, distributed=self.ctx.distributed,
                       group=group)[tasks["steps"]]

        def rank(mean: float, diverged: int) -> tuple:  # lower is better: fewer diverged tasks, then the figure
            return diverged, -mean if problem.higher_is_better else mean

        again = self.best is not None and self.best[0] == iteration  # best.pt's iteration, validated after a resume
        better = math.isfinite(est.mean) and (again or self.best is None
                                              or rank(est.mean, est.diverged) < rank(*self.best[1:]))
        if better and not _all_finite(list(self.learner.parameters())):  # every rank: all stop alike
            raise self._diverged("the parameters became non-finite (best.pt not written)", iteration)
        if better and not again and self.ctx.is_main:
            # best.prev.pt stays the best as of the last checkpoint, which a resume from it needs
            checkpointed = self.good[1] if self.good else 0
            save_checkpoint(self.out / BEST, dict(
                config=dataclasses.asdict(cfg), iteration=iteration, learner=self.learner.state_dict(),
                validation=dict(metric=problem.metric_name, **tasks, **vars(est))),
                keep_previous=self.best is None or self.best[0] <= checkpointed)
        if better:
            self.best = (iteration, est.mean, est.diverged)
        shown = {f"val_{problem.metric_name}": est.mean}
        if not self.ctx.is_main:
            return shown
        metrics.write(json.dumps({"iteration": iteration, f"val_{problem.metric_name}": est.mean,
                                  "val_ci95": est.ci95, "best": better}) + "\n")
        metrics.flush()
        if self.writer is not None:
            self.writer.add_scalar(f"val/{problem.metric_name}", est.mean, iteration)
        return shown

    def record_conv_choices(self) -> None:
        """Rank 0, when the convolutions' strategies (``--conv-strategy``) gained a choice:
        written to conv_strategy.json (a dict compared per iteration, no more); under ``auto``,
        which measures them, each new choice is also printed once."""
        choices = self.learner.conv_choices()
        if not self.ctx.is_main or choices == self.conv_choices:
            return
        new = [f"{layer} {shape}: {how}" for layer, shapes in choices.items() for shape, how in shapes.items()
               if self.conv_choices.get(layer, {}).get(shape) != how]
        self.conv_choices = choices
        write_json(self.out / CONV_STRATEGY, {"conv_strategy": self.cfg.conv_strategy, "layers": choices})
        if self.cfg.conv_strategy == "auto":
            print(f"convolutions (auto): {'; '.join(new)}", file=sys.stderr)

    def save(self, iteration: int) -> None:
        """A checkpoint (rank 0 writes it; every rank's generators are in it), only when the
        parameters and the optimiser state are finite."""
        optimizer_state = graphs.portable_optimizer_state(self.optimizer)  # alike with and without --cuda-graph
        tensors = [*self.learner.parameters(), *(t for _, t in named_tensors(optimizer_state["state"]))]
        if not _all_finite(tensors):  # the same on every rank: the parameters are the same
            raise self._diverged("the parameters or the optimiser state became non-finite (not saved)", iteration)
        if self.ctx.distributed:
            task_states = distributed.all_gather_rows(self.task_gen.get_state())
            fisher_states = distributed.all_gather_rows(self.fisher_gen.get_state().cpu())
        path = self.out / CHECKPOINT
        if self.ctx.is_main:
            state = dict(config=dataclasses.asdict(self.cfg), iteration=iteration, learner=self.learner.state_dict(),
                         optimizer=optimizer_state, task_generator=self.task_gen.get_state(),
                         fisher_generator=self.fisher_gen.get_state().cpu())
            if self.ctx.distributed:
                state.update(world_size=self.ctx.world_size, task_generators=task_states,
                             fisher_generators=fisher_states)
            save_checkpoint(path, state)
        self.good, self.saved_at = (path, iteration), iteration

    def _diverged(self, what: str, iteration: int) -> FloatingPointError:
        if self.good is None:
            advice = "no checkpoint was written yet: start again with a smaller --meta-lr or --inner-lr"
        else:
            advice = (f"the last good checkpoint is {self.good[0]} (iteration {self.good[1]}); continue from it "
                      f"with a smaller learning rate, e.g. python -m fastlaplace.train --resume --out {self.cfg.out} "
                      f"--meta-lr {self.cfg.meta_lr / 10:g}")
        return FloatingPointError(f"{what} at iteration {iteration}; {advice}")

    # ------------------------------------------------------------------------ finish
    def finish(self, evaluate_at_end: bool = True, progress: bool = True) -> dict:
        """The final checkpoint, then (with ``evaluate_at_end``) the evaluation on new test
        tasks, split over the ranks; rank 0 writes results.json and reports. Returns the results."""
        if self.saved_at != self.iteration:
            self.save(self.iteration)
        if not evaluate_at_end:
            return {}
        cfg, problem = self.cfg, self.problem
        group = evaluation_group(cfg, cfg.eval_tasks, "--eval-tasks", self.device)
        results = evaluate(self.learner, problem, cfg.test_inner_steps, cfg.eval_tasks, cfg.eval_seed,
                           device=self.device, progress=progress and self.ctx.is_main,
                           distributed=self.ctx.distributed, group=group)
        summary = {
            "dataset": cfg.dataset, "method": cfg.method, "iterations": cfg.iterations, "metric": problem.metric_name,
            "test": {str(s): vars(e) for s, e in results.items()},
        }
        if self.best is not None:
            best = self._best_learner()
            now = self.learner.state_dict()
            same = all(torch.equal(t, now[k]) for k, t in best.state_dict().items())  # best.pt is the last
            best_results = results if same else evaluate(
                best, problem, cfg.test_inner_steps, cfg.eval_tasks, cfg.eval_seed, device=self.device,
                progress=progress and self.ctx.is_main, distributed=self.ctx.distributed, group=group)
            summary["best"] = {"checkpoint": BEST, "iteration": self.best[0],
                               f"val_{problem.metric_name}": self.best[1],
                               "test": {str(s): vars(e) for s, e in best_results.items()}}
        if self.ctx.is_main:
            write_json(self.out / RESULTS, summary)
            for s, est in results.items():
                print(f"test {problem.metric_name} after {s} inner step(s): {est}  (mean ± 95% CI, {est.n} tasks)")
            if self.best is not None:
                for s, est in best_results.items():
                    print(f"{BEST} (iteration {self.best[0]}, the best validated): test {problem.metric_name} after "
                          f"{s} inner step(s): {est}  (mean ± 95% CI, {est.n} tasks)")
        return summary

    def _best_learner(self):
        """The learner with best.pt's parameters (rank 0 reads the file, every rank gets them)."""
        state = distributed.on_main_rank(lambda: read_checkpoint(self.out / BEST)["learner"], self.ctx, EXPECTED)
        best = copy.deepcopy(self.learner)
        best.load_state_dict(state)
        return best

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None


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


def _generators(cfg: Config, ctx: distributed.Context, device: str, iteration: int = 0):
    """The task and Fisher-label generators of this rank: seeded by ``seed`` and ``seed + 1``
    in a one-process run (started at iteration 0), else from (seed, rank, iteration)."""
    if ctx.world_size == 1 and iteration == 0:
        return torch.Generator().manual_seed(cfg.seed), torch.Generator(device=device).manual_seed(cfg.seed + 1)
    return (torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, ctx.rank, iteration, "tasks")),
            torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed, ctx.rank, iteration, "fisher")))


def _check_memory(cfg: Config, local_tasks: int, device) -> None:
    """Refuse a meta-batch or an evaluation chunk that cannot fit in the device's memory."""
    what, needed = cfg.batch_memory(local_tasks, cfg.inner_steps)
    check_memory(f"one meta-batch of --meta-batch {cfg.meta_batch} ({local_tasks} in this process) tasks of {what}"
                 f" and --inner-steps {cfg.inner_steps}", needed, device)
    evaluation_group(cfg, cfg.eval_tasks, "--eval-tasks", device)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One synchronisation per device (Adam keeps its step counts on the CPU)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / TENSORBOARD))


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool]:
    """(the run's settings, ``--resume``, whether to show progress bars) from the command line:
    one flag per setting of :class:`~fastlaplace.config.Config`, and the program's own."""
    p = argparse.ArgumentParser(prog="python -m fastlaplace.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.json", help="a JSON file of settings (command-line options override it)")
    groups = add_arguments(p)
    groups["run"].add_argument("--resume", action="store_true",
                               help="continue from DIR/checkpoint.pt with the run's settings (options given "
                                    "override them)")
    groups["run"].add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    return settings(given(args), args.config, args.resume), args.resume, not args.no_progress


def main(argv: list[str] | None = None) -> dict:
    with errors_as_messages():
        cfg, resume, progress = parse_args(argv)
        return train(cfg, resume=resume, progress=progress)


if __name__ == "__main__":
    main()
