"""Figures: ``python -m fastlaplace.plot posterior CHECKPOINT`` (the paper's Figure 5),
``python -m fastlaplace.plot curves RUN_DIR`` (training curves) and ``python -m
fastlaplace.plot reliability CHECKPOINT`` (the reliability diagram of an image run: LLAMA's
posterior predictive against MAML's point prediction). Needs matplotlib
(``pip install fastlaplace[plots]``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .calibration import BINS, Reliability, reliability
from .cli import MAXIMA, check_output, check_seed, errors_as_messages, positive_float, positive_int
from .config import LOGDET_METHODS
from .datasets import DATASETS
from .meta import LLAMA
from .runs import METRICS, checkpoint_inputs, is_validation, load_for_evaluation, read_metrics, run_files
from .uncertainty import calibrate, classification_report


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("error: plotting needs matplotlib: pip install 'fastlaplace[plots]'") from exc
    return plt


def posterior_figure(learner, tasks, out: str, tau: float, point_learner=None, samples: int = 20, seed: int = 3,
                     method: str | None = None, linearized: bool = True, steps: int | None = None) -> None:
    """Figure 5 of the paper for one new sinusoid: support points over the whole range (left)
    and only in its lowest fifth (right); ground truth, MAML's adapted prediction and LLAMA's
    posterior samples with their ±2 standard deviation band."""
    plt = _pyplot()
    steps = learner.inner_steps if steps is None else steps
    lo, hi = tasks.x_range
    g = torch.Generator().manual_seed(seed)
    base = tasks.sample(1, g)
    amp, phase = base.amplitude, base.phase
    grid = torch.linspace(lo, hi, 400).view(1, -1, 1)
    truth = tasks.evaluate(grid, amp, phase)[0, :, 0]
    cases = [("support over the whole range", (lo, hi)), ("support in the lowest fifth only", (lo, lo + (hi - lo) / 5))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    point = point_learner or learner
    for ax, (title, rng) in zip(axes, cases):
        xs = torch.rand((1, tasks.support, 1), generator=g) * (rng[1] - rng[0]) + rng[0]
        ys = tasks.evaluate(xs, amp, phase)
        post = learner.posterior(xs, ys, tau=tau, method=method, steps=steps)
        pred = post.predict(grid, 200, g, linearized=linearized)
        with torch.no_grad():
            f_point = point.predict(point.adapt(xs, ys, steps=steps), grid)[0, :, 0]
        x = grid[0, :, 0]
        mean, std = pred.mean[0, :, 0], pred.std[0, :, 0]
        ax.fill_between(x, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.15, label="LLAMA ±2 sd")
        for s in range(min(samples, pred.samples.shape[0])):
            ax.plot(x, pred.samples[s, 0, :, 0], color="tab:blue", lw=0.6, alpha=0.5,
                    label="LLAMA posterior samples" if s == 0 else None)
        ax.plot(x, truth, color="black", lw=1.5, label="ground truth")
        ax.plot(x, f_point, color="tab:red", lw=1.5, ls="--", label="MAML adapted prediction")
        ax.scatter(xs[0, :, 0], ys[0, :, 0], color="tab:orange", zorder=5, s=25, label="support points")
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_ylim(-7, 7)
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"Posterior samples of a new task after {steps} inner steps (τ = {tau:g}, "
                 f"{method or learner.logdet_method} K-FAC, {'linearised' if linearized else 'sampled-network'} "
                 "predictive)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _validation_rows(rows: list[dict]) -> tuple[str, list[dict]] | None:
    """(metric, rows) of ``--val-every``'s lines of metrics.jsonl (``val_<metric>``, ``val_ci95``,
    ``best``), or ``None`` when there are none."""
    found = [r for r in rows if is_validation(r)]
    metric = next((k[4:] for k in found[0] if k.startswith("val_") and k != "val_ci95"), None) if found else None
    if metric is None:
        return None
    return metric, [r for r in found if isinstance(r.get(f"val_{metric}"), (int, float))]


def curves_figure(run_dir: str, out: str) -> None:
    """Meta-training loss (and LLAMA's mean log det Ĥ) against iterations, from metrics.jsonl;
    with ``--val-every``'s lines, the validation metric with its 95 % interval, best.pt's
    iteration marked."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: is {run_dir} the output folder of a run?")
    every = read_metrics(path)
    rows = [r for r in every if isinstance(r.get("query_loss"), (int, float))]
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    plt = _pyplot()
    it = [r["iteration"] for r in rows]
    has_logdet = all(isinstance(r.get("logdet"), (int, float)) for r in rows)
    validation = _validation_rows(every)
    panels = 1 + has_logdet + (validation is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    axes[0, 0].plot(it, [r["query_loss"] for r in rows], lw=0.8)
    axes[0, 0].set_xlabel("iteration")
    axes[0, 0].set_ylabel("query loss")
    axes[0, 0].set_yscale("log")
    if has_logdet:
        axes[0, 1].plot(it, [r["logdet"] for r in rows], lw=0.8, color="tab:green")
        axes[0, 1].set_xlabel("iteration")
        axes[0, 1].set_ylabel("mean log det Ĥ")
    if validation is not None:
        metric, val = validation
        ax = axes[0, panels - 1]
        ci = [r["val_ci95"] if isinstance(r.get("val_ci95"), (int, float)) else 0.0 for r in val]
        ax.errorbar([r["iteration"] for r in val], [r[f"val_{metric}"] for r in val], yerr=ci, marker="o", ms=3,
                    lw=0.8, capsize=2, color="tab:purple")
        best = [r for r in val if r.get("best") is True]
        if best:  # the last line that was best at its time is best.pt's
            at = best[-1]["iteration"]
            ax.axvline(at, color="black", ls="--", lw=0.8, label=f"best.pt (iteration {at})")
            ax.legend(fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


RELIABILITY_PANELS = (("llama_mc", "LLAMA, posterior predictive (MC)"), ("maml_point", "MAML, point prediction"),
                      ("maml_temperature", "MAML, temperature-scaled"))


def reliability_figure(rels: dict[str, Reliability], out: str, title: str) -> None:
    """Accuracy against confidence in BINS equal-width bins (every test query pooled), one panel
    per predictor of RELIABILITY_PANELS, with its ECE and MCE; the bars' shade says how many
    queries a bin holds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(RELIABILITY_PANELS), figsize=(4 * len(RELIABILITY_PANELS), 4), sharey=True)
    edges = torch.linspace(0, 1, BINS + 1)
    for ax, (key, label) in zip(axes, RELIABILITY_PANELS):
        rel = rels[key]
        share = (rel.count / rel.count.sum()).float()
        for b in range(BINS):
            if rel.count[b] > 0:
                ax.bar(float(edges[b]), float(rel.accuracy[b]), width=1 / BINS, align="edge", color="tab:blue",
                       alpha=0.25 + 0.75 * float(share[b] / share.max()), edgecolor="black", lw=0.5)
        ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="perfect calibration")
        ax.plot(rel.confidence[rel.count > 0], rel.accuracy[rel.count > 0], "o", color="tab:red", ms=3,
                label="mean confidence of the bin")
        ax.set_title(f"{label}\nECE {rel.ece:.3f}, MCE {rel.mce:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _reliability_title(report: dict) -> str:
    return (f"Reliability on {report['episodes']} test episodes ({BINS} equal-width bins, every query pooled; "
            f"LLAMA: {report['samples']} posterior samples, prior {report['prior']})")


def _saved_reliability(path: str) -> tuple[dict[str, Reliability], str]:
    """The bins and the title of a saved report of fastlaplace.uncertainty."""
    try:
        with open(path) as f:
            report = json.load(f)
        rels = {}
        for key, _ in RELIABILITY_PANELS:
            bins = report[key]["reliability"]
            rels[key] = Reliability(*(torch.tensor([math.nan if v is None else v for v in bins[k]],
                                                   dtype=torch.float64) for k in ("count", "confidence", "accuracy")))
        return rels, _reliability_title(report)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a report of fastlaplace.uncertainty on an image run ({exc!r})") from exc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastlaplace.plot", description=__doc__)
    sub = p.add_subparsers(dest="figure", required=True)
    pp = sub.add_parser("posterior", help="Figure 5: posterior samples on a new sinusoid")
    pp.add_argument("checkpoint")
    pp.add_argument("--out", default="posterior.png")
    pp.add_argument("--maml", help="a MAML checkpoint for the point prediction (default: the LLAMA run's φ̂)")
    pp.add_argument("--tau", type=float, help="prior precision (default: chosen on validation tasks)")
    pp.add_argument("--method", choices=LOGDET_METHODS)
    pp.add_argument("--sampled-networks", action="store_true")
    pp.add_argument("--seed", type=int, default=3)
    pp.add_argument("--steps", type=int, default=None, help="inner steps of the adaptation (default: the run's K)")
    pc = sub.add_parser("curves", help="training curves of a run")
    pc.add_argument("run_dir")
    pc.add_argument("--out", default="curves.png")
    pr = sub.add_parser("reliability", help="reliability diagram of an image run: LLAMA against MAML")
    pr.add_argument("checkpoint", nargs="?", help="a LLAMA checkpoint of an image run")
    pr.add_argument("--report", help="instead of a checkpoint: the --json report of fastlaplace.uncertainty on "
                                     "an image run (draws its bins without computing them again)")
    pr.add_argument("--out", default="reliability.png")
    pr.add_argument("--maml", help="a MAML checkpoint of the same data set (default: the LLAMA run's φ̂)")
    pr.add_argument("--tasks", type=int, default=600, help="test episodes")
    pr.add_argument("--samples", type=int, default=100, help="posterior samples per episode")
    pr.add_argument("--data-root", default=None, help="the data folder of an image run")
    args = p.parse_args(argv)
    with errors_as_messages():
        drawable = tuple(name for name, spec in DATASETS.items() if args.figure in spec.figures)
        if args.figure == "curves":
            check_output("--out", args.out, run_files(args.run_dir))
            curves_figure(args.run_dir, args.out)
        elif args.figure == "reliability" and args.report:
            if args.checkpoint or args.maml:
                raise ValueError("give a checkpoint or --report, not both")
            check_output("--out", args.out, [args.report])
            rels, title = _saved_reliability(args.report)
            reliability_figure(rels, args.out, title)
        elif args.figure == "reliability":
            if not args.checkpoint:
                raise ValueError("reliability needs a LLAMA checkpoint of an image run, or --report")
            check_output("--out", args.out, [*checkpoint_inputs(args.checkpoint, args.maml), args.data_root])
            positive_int("--tasks", args.tasks, 1, MAXIMA["eval_tasks"])
            positive_int("--samples", args.samples, 2, MAXIMA["samples"])
            needs = dict(device="cpu", data_root=args.data_root, datasets=drawable,
                         purpose="the reliability diagram needs a LLAMA run of an image data set")
            learner, problem, cfg = load_for_evaluation(args.checkpoint, **needs)
            if not isinstance(learner, LLAMA):
                raise ValueError(f"{args.checkpoint}: the reliability diagram needs a LLAMA run (--method llama)")
            point = load_for_evaluation(args.maml, **needs)[0] if args.maml else None
            result = classification_report(learner, problem, point, args.tasks, cfg.eval_seed, args.samples,
                                           steps=cfg.test_inner_steps[-1])
            rels = {key: reliability(result.probs[key], result.y) for key, _ in RELIABILITY_PANELS}
            reliability_figure(rels, args.out, _reliability_title(result.report))
        else:
            check_output("--out", args.out, checkpoint_inputs(args.checkpoint, args.maml))
            if args.tau is not None:
                positive_float("--tau", args.tau)
            if args.steps is not None:
                positive_int("--steps", args.steps, 0, MAXIMA["inner_steps"])
            check_seed("--seed", args.seed)
            needs = dict(device="cpu", datasets=drawable,
                         purpose="the posterior figure needs a LLAMA sinusoid checkpoint")
            learner, problem, _ = load_for_evaluation(args.checkpoint, **needs)
            if not isinstance(learner, LLAMA) or not hasattr(problem, "tasks"):
                raise ValueError(f"{args.checkpoint}: the posterior figure needs a LLAMA sinusoid checkpoint")
            point = load_for_evaluation(args.maml, **needs)[0] if args.maml else None
            tau = args.tau
            if tau is None:
                tau = calibrate(learner, problem, point, method=args.method,
                                linearized=not args.sampled_networks).prior.tau  # a scalar chosen on validation
            posterior_figure(learner, problem.tasks, args.out, tau, point, seed=args.seed, method=args.method,
                             linearized=not args.sampled_networks, steps=args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
