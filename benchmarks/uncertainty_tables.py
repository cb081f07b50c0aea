"""Markdown tables of saved ``python -m fastlaplace.uncertainty ... --json`` reports.

    python benchmarks/uncertainty_tables.py regression runs/regression/*.json
    python benchmarks/uncertainty_tables.py classification runs/digits-uncertainty/1shot-seed*.json

Regression: one row per report (prior, method, coverage, NLL, sd ratio). Classification: per
predictor and metric, the value of each report (a seed) as mean ± 95 % CI over its episodes,
and the mean over the reports; then LLAMA (Monte Carlo) − MAML per seed for the issue's two
targets (ECE against the point prediction's, NLL against the temperature-scaled one's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastlaplace.uncertainty import METRICS, PREDICTORS


def cell(e: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * e['mean']:.{digits}f} ± {scale * e['ci95']:.{digits}f}"


def regression(reports: list[tuple[str, dict]]) -> None:
    print("| report | prior | method | coverage 50 % | coverage 90 % | predictive NLL | MAML point NLL | sd ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in reports:
        print(f"| {name} | {r['prior']} | {r['method']} | {cell(r['coverage50'])} | {cell(r['coverage90'])} | "
              f"{cell(r['llama_nll'])} | {cell(r['maml_point_nll'])} | {cell(r['extrapolation_std_ratio'], 1, 2)} |")


def overconfidence(bins: dict) -> float:
    """Mean confidence minus accuracy over every query, from a report's reliability bins."""
    rows = [(n, c, a) for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"]) if n]
    return sum(n * (c - a) for n, c, a in rows) / sum(n for n, _, _ in rows)


def classification(reports: list[tuple[str, dict]]) -> None:
    names = [n for n, _ in reports]
    print("| predictor | metric | " + " | ".join(names) + " | mean of the reports |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for key, label in PREDICTORS.items():
        for metric, mlabel in METRICS.items():
            values = [r[key][metric] for _, r in reports]
            mean = sum(v["mean"] for v in values) / len(values)
            print(f"| {label} | {mlabel} | " + " | ".join(cell(v) for v in values) + f" | {mean:.3f} |")
    print("\nper report: accuracy LLAMA − MAML (points), ECE LLAMA / ECE MAML point, "
          "NLL LLAMA − NLL MAML temperature-scaled (its CI: the two CIs combined in quadrature), "
          "mean confidence − accuracy of LLAMA and MAML point (> 0: over-confident)")
    for name, r in reports:
        acc = 100 * (r["llama_mc"]["accuracy"]["mean"] - r["maml_point"]["accuracy"]["mean"])
        ratio = r["llama_mc"]["ece"]["mean"] / r["maml_point"]["ece"]["mean"]
        a, b = r["llama_mc"]["nll"], r["maml_temperature"]["nll"]
        half = (a["ci95"] ** 2 + b["ci95"] ** 2) ** 0.5
        gaps = ", ".join(f"{overconfidence(r[key]['reliability']):+.3f}" for key in ("llama_mc", "maml_point"))
        print(f"- {name}: accuracy {acc:+.1f} points, ECE ratio {ratio:.2f}, NLL {a['mean'] - b['mean']:+.3f} ± "
              f"{half:.3f} (temperature {r['temperature']:.2f}), confidence − accuracy {gaps}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("regression", "classification"))
    p.add_argument("reports", nargs="+", type=Path)
    args = p.parse_args()
    reports = [(path.stem, json.loads(path.read_text())) for path in args.reports]
    (regression if args.kind == "regression" else classification)(reports)


if __name__ == "__main__":
    main()
