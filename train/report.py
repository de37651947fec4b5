"""``python -m train.report runs/``: tables and plots from finished runs.

Collects every result.json under the folder (with its metrics.jsonl), averages
the last-epoch test accuracy over seeds and writes, into ``--out`` (default
``<runs>/report``):
  table_<noise>_<setup>.csv / .md  the paper's layout: a row per loss, a column
                                   per noise rate, mean ± std (n runs), with the
                                   published number beside;
  accuracy_vs_rate_<noise>_<setup>.png, learning_curves_<noise>_<setup>.png,
  epoch_time.png (median epoch time per loss and backend), report.md.
A setup is model, epochs, AMP and backend: runs differing in those are never
averaged together.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

from .paper_results import SYMMETRIC, paper_accuracy

PAPER_ORDER = list(SYMMETRIC)


def collect(runs_dir: str) -> list:
    """Every finished run under ``runs_dir``: its result.json plus "curve" (metrics rows)."""
    runs = []
    for folder, _, files in os.walk(runs_dir):
        if "result.json" not in files:
            continue
        with open(os.path.join(folder, "result.json")) as f:
            result = json.load(f)
        curve = []
        if "metrics.jsonl" in files:
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                curve = [json.loads(line) for line in f if line.strip()]
        result["curve"] = curve
        runs.append(result)
    return runs


def noise_label(run: dict) -> str:
    noise = run["noise"]
    return noise["type"] + ("-official" if noise.get("recipe") == "official" else "")


def setup_label(run: dict) -> str:
    return f"{run['model']}_e{run['epochs']}_{run['amp']}_{run['backend']}"


def _loss_order(losses) -> list:
    return [l for l in PAPER_ORDER if l in losses] + sorted(l for l in losses if l not in PAPER_ORDER)


def _mean_std(values) -> tuple:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def accuracy_tables(runs: list) -> dict:
    """{(noise, setup): {"rates": [...], "losses": [...], "cells": {(loss, rate): (mean, std, n, paper)}}}."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = (noise_label(run), setup_label(run))
        groups[key][(run["loss"], round(run["noise"]["rate"], 6))].append(run["final"]["test_acc"])
    tables = {}
    for (noise, setup), cells in groups.items():
        rates = sorted({rate for _, rate in cells})
        losses = _loss_order({loss for loss, _ in cells})
        base = noise.split("-")[0]
        tables[(noise, setup)] = {
            "rates": rates, "losses": losses,
            "cells": {k: _mean_std(v) + (paper_accuracy(base, k[0], k[1]),) for k, v in cells.items()}}
    return tables


def _fmt(cell) -> str:
    mean, std, n, _ = cell
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def write_table(table: dict, noise: str, setup: str, out: str) -> tuple:
    """CSV (mean, std, n, paper per rate) and Markdown ("mean ± std (paper p)") of one table."""
    stem = os.path.join(out, f"table_{noise}_{setup}")
    rates, losses, cells = table["rates"], table["losses"], table["cells"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss"] + [f"{r:g}_{field}" for r in rates for field in ("mean", "std", "n", "paper")])
        for loss in losses:
            row = [loss]
            for r in rates:
                mean, std, n, paper = cells.get((loss, r), (None, None, 0, paper_accuracy(noise.split("-")[0], loss, r)))
                row += ["" if mean is None else f"{mean:.2f}", "" if std is None else f"{std:.2f}", n,
                        "" if paper is None else f"{paper:.2f}"]
            w.writerow(row)
    lines = [f"**CIFAR-10, {noise} noise, {setup}**: last-epoch test accuracy (%), mean ± std over seeds "
             f"(n runs), published value of Ma et al. in brackets.", "",
             "| Loss | " + " | ".join(f"η = {r:g}" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for loss in losses:
        row = []
        for r in rates:
            cell = cells.get((loss, r))
            paper = paper_accuracy(noise.split("-")[0], loss, r)
            text = "–" if cell is None else f"{_fmt(cell)} ({cell[2]})"
            row.append(text + (f" [{paper:.2f}]" if paper is not None else ""))
        lines.append(f"| {loss.upper()} | " + " | ".join(row) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem + ".csv", stem + ".md", "\n".join(lines)


def _colors(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_accuracy_vs_rate(table: dict, noise: str, setup: str, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    base = noise.split("-")[0]
    for color, loss in zip(_colors(len(table["losses"])), table["losses"]):
        rates = [r for r in table["rates"] if (loss, r) in table["cells"]]
        means = [table["cells"][(loss, r)][0] for r in rates]
        stds = [table["cells"][(loss, r)][1] for r in rates]
        ax.errorbar(rates, means, yerr=stds, marker="o", capsize=3, color=color, label=loss.upper())
        paper = [(r, paper_accuracy(base, loss, r)) for r in table["rates"]]
        paper = [(r, p) for r, p in paper if p is not None]
        if paper:
            ax.plot(*zip(*paper), linestyle=":", marker="x", color=color, alpha=0.7)
    ax.set_xlabel("noise rate η")
    ax.set_ylabel("test accuracy (%), last epoch")
    ax.set_title(f"CIFAR-10, {noise} noise ({setup}); dotted ×: published")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(runs: list, noise: str, setup: str, path: str) -> None:
    """Per rate: test accuracy and accuracy on the noisy training labels against the epoch, mean over seeds."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    curves = defaultdict(list)
    for run in runs:
        if noise_label(run) == noise and setup_label(run) == setup and run["curve"]:
            curves[(run["loss"], round(run["noise"]["rate"], 6))].append(run["curve"])
    rates = sorted({r for _, r in curves})
    losses = _loss_order({l for l, _ in curves})
    fig, axes = plt.subplots(2, len(rates), figsize=(3.6 * len(rates) + 1.8, 6.4), squeeze=False, sharey="row")
    for col, rate in enumerate(rates):
        for color, loss in zip(_colors(len(losses)), losses):
            if (loss, rate) not in curves:
                continue
            group = curves[(loss, rate)]
            length = min(len(c) for c in group)
            epochs = [row["epoch"] for row in group[0][:length]]
            for row_i, field in enumerate(("test_acc", "noisy_acc")):
                values = np.mean([[row[field] for row in c[:length]] for c in group], axis=0)
                axes[row_i][col].plot(epochs, values, color=color, label=loss.upper(), marker="." if length < 10 else None)
        axes[0][col].set_title(f"η = {rate:g}")
        axes[1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[1][0].set_ylabel("train acc. on noisy labels (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.suptitle(f"Learning curves, CIFAR-10, {noise} noise ({setup})")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def epoch_times(runs: list) -> dict:
    """{(model, device_name): {(loss, "backend amp"): median epoch seconds over runs}}.

    A run's epoch time is the median of its epochs after the first (the first
    alone when the run had one epoch)."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        t = run["timing"]
        seconds = t["median_epoch_s"] if t["median_epoch_s"] is not None else t["first_epoch_s"]
        groups[(run["model"], run.get("device_name") or run["device"])][(run["loss"], f"{run['backend']} {run['amp']}")].append(seconds)
    return {k: {kk: float(np.median(v)) for kk, v in g.items()} for k, g in groups.items()}


def plot_epoch_time(runs: list, path: str) -> dict:
    import matplotlib.pyplot as plt
    times = epoch_times(runs)
    fig, axes = plt.subplots(len(times), 1, figsize=(10, 4.2 * len(times)), squeeze=False)
    for ax, ((model, device), cells) in zip(axes[:, 0], sorted(times.items())):
        losses = _loss_order({l for l, _ in cells})
        variants = sorted({v for _, v in cells})
        width = 0.8 / len(variants)
        for i, (color, variant) in enumerate(zip(_colors(len(variants)), variants)):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(losses))]
            ax.bar(xs, [cells.get((l, variant), np.nan) for l in losses], width, color=color, label=variant)
        ax.set_xticks(range(len(losses)), [l.upper() for l in losses], rotation=30, ha="right")
        ax.set_ylabel("median epoch time (s)")
        ax.set_title(f"{model} on {device}: epoch time per loss and backend (first epoch excluded)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(title="backend amp", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return times


def make_report(runs_dir: str, out: str = None) -> dict:
    """Write all tables and plots; returns {"tables": [...], "plots": [...], "markdown": path}."""
    import matplotlib
    matplotlib.use("Agg")
    out = out or os.path.join(runs_dir, "report")
    runs = collect(runs_dir)
    if not runs:
        raise SystemExit(f"no finished runs (result.json) under {runs_dir}")
    os.makedirs(out, exist_ok=True)
    written = {"tables": [], "plots": []}
    sections = [f"# CIFAR-10 noisy-label results ({len(runs)} runs from {runs_dir})", ""]
    for (noise, setup), table in sorted(accuracy_tables(runs).items()):
        csv_path, md_path, markdown = write_table(table, noise, setup, out)
        written["tables"] += [csv_path, md_path]
        acc_png = os.path.join(out, f"accuracy_vs_rate_{noise}_{setup}.png")
        curves_png = os.path.join(out, f"learning_curves_{noise}_{setup}.png")
        plot_accuracy_vs_rate(table, noise, setup, acc_png)
        plot_learning_curves(runs, noise, setup, curves_png)
        written["plots"] += [acc_png, curves_png]
        sections += [markdown, "", f"![accuracy vs rate]({os.path.basename(acc_png)})",
                     f"![learning curves]({os.path.basename(curves_png)})", ""]
    time_png = os.path.join(out, "epoch_time.png")
    times = plot_epoch_time(runs, time_png)
    written["plots"].append(time_png)
    sections += ["## Epoch time (median over runs of each run's median epoch after the first)", "",
                 "| model | device | loss | backend amp | seconds |", "|---|---|---|---|---|"]
    for (model, device), cells in sorted(times.items()):
        for (loss, variant), s in sorted(cells.items()):
            sections.append(f"| {model} | {device} | {loss} | {variant} | {s:.3f} |")
    sections += ["", f"![epoch time]({os.path.basename(time_png)})", ""]
    written["markdown"] = os.path.join(out, "report.md")
    with open(written["markdown"], "w") as f:
        f.write("\n".join(sections))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report",
                                description="Aggregate finished runs into the paper's tables (CSV, Markdown) "
                                            "and PNG plots.")
    p.add_argument("runs", nargs="?", default="runs", help="folder searched for result.json files")
    p.add_argument("--out", default=None, help="output folder (default: <runs>/report)")
    args = p.parse_args(argv)
    written = make_report(args.runs, args.out)
    for path in written["tables"] + written["plots"] + [written["markdown"]]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
