"""``python -m train.report runs/``: tables and plots from finished runs.

Collects every result.json under the folder (with its metrics.jsonl) and
averages the last-epoch test accuracy over seeds.  Runs are grouped by their
full identity (config.json's "identity": every setting that changes a result)
apart from the table's own axes (loss, noise rate) and the seed, so runs that
differ in anything else are never averaged together.  Writes, into ``--out``
(default ``<runs>/report``), per group ``<noise>_<setup>``:
  table_*.csv / .md         a row per loss, a column per noise rate, mean ± std
                            (n runs), the published numbers beside: Ma et al.'s
                            and the epsilon-softmax paper's Table 2 (its own
                            reruns of the baselines), where they have the cell;
  accuracy_vs_rate_*.png    test accuracy against the noise rate;
  learning_curves_*.png     test accuracy, training accuracy on the clean and on
                            the noisy labels (memorisation), training loss;
and epoch_time.png, report.md.  Results on data that differ from the official
release (synthetic, subsets, md5 mismatch) are marked wherever they appear,
published numbers included.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import defaultdict

import numpy as np

from .paper_results import SOURCES, SYMMETRIC, published_entry

PAPER_ORDER = list(SYMMETRIC)
# Identity keys that are a table's axes or averaged over, not part of its setup
# (the CIFAR-N label sets of one file share a table: its columns).
AXES = ("loss", "rate", "seed", "noise_seed", "noise", "noise_recipe", "label_set")
NOISE_WORDS = {"sym": "symmetric", "asym": "asymmetric", "human": "human (CIFAR-N)"}
DATASET_WORDS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
NOT_OFFICIAL = "NOT THE OFFICIAL DATA"
# The CSV columns of each source of published numbers, per rate ("paper" is Ma et al.'s).
CSV_COLUMNS = {"ma": ("paper",), "eps-softmax": ("eps_softmax", "eps_softmax_std")}
# How each source's numbers are drawn in the accuracy-vs-rate plot.
PLOT_STYLES = {"ma": dict(linestyle=":", marker="x"), "eps-softmax": dict(linestyle="--", marker="+")}


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


def canonical_loss(name: str) -> str:
    """nce+rce for rce+nce, ce+rce for sce: the name runs are grouped by."""
    from apl_kernels import LossSpec
    try:
        return LossSpec.from_name(name).name
    except ValueError:
        return name


def loss_label(loss: str) -> str:
    """SCE for ce+rce, upper case, parameters that tell rows apart kept as written."""
    name, _, params = loss.partition(" (")
    return {"ce+rce": "SCE"}.get(name, name.upper()) + (f" ({params}" if params else "")


def identity(run: dict) -> dict:
    """The run's identity; runs written before identities existed get theirs from their fields."""
    if "identity" in run:
        return run["identity"]
    return {"model": run["model"], "epochs": run["epochs"], "amp": run["amp"], "backend": run["backend"],
            "loss": dict(run["loss_spec"], name=canonical_loss(run["loss"])), "seed": run["seed"],
            "rate": run["noise"]["rate"], "noise": run["noise"]["type"], "noise_recipe": run["noise"].get("recipe")}


def data_deviations(run: dict) -> list:
    """How the run's data differ from the official release ([] when they do not)."""
    data = run.get("data", {})
    if "deviations" in data:
        return data["deviations"]
    out = []
    if data.get("folder") == "synthetic":
        out.append("synthetic (random images)")
    if data.get("differing_from_release"):
        out.append(f"md5 mismatch: {', '.join(data['differing_from_release'])}")
    if data.get("folder") != "synthetic" and (data.get("train"), data.get("test")) != (50000, 10000):
        out.append(f"subset: {data.get('train')} training and {data.get('test')} test images")
    return out


def noise_rate(run: dict) -> float:
    """The run's column: --rate, or for human noise (no --rate) its label set's realised rate."""
    noise = run["noise"]
    return round(noise["rate"], 6) if noise.get("rate") is not None else round(noise["realised_rate"], 4)


def noise_label(run: dict) -> str:
    noise = run["noise"]
    return noise["type"] + ("-official" if noise.get("recipe") == "official" else "")


def setup_of(run: dict) -> dict:
    """The settings shared by a table's runs: the identity less its axes, plus the data's deviations."""
    setup = {k: v for k, v in identity(run).items() if k not in AXES}
    setup["data_deviations"] = data_deviations(run)
    return setup


def setup_label(run: dict) -> str:
    """A file-name-safe label: model, epochs, AMP, backend and a hash of the whole setup."""
    setup = setup_of(run)
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:6]
    dataset = setup.get("dataset", "cifar10")
    return (f"{dataset + '_' if dataset != 'cifar10' else ''}{setup['model']}_e{setup['epochs']}_{setup['amp']}_"
            f"{setup['backend']}{'_NOT-OFFICIAL-DATA' if setup['data_deviations'] else ''}_{digest}")


def setup_words(setup: dict) -> str:
    """The setup in words, for titles."""
    dataset = DATASET_WORDS.get(setup.get("dataset", "cifar10"), setup.get("dataset"))
    return f"{dataset}, {setup['model']}, {setup['epochs']} epochs, AMP {setup['amp']}, backend {setup['backend']}"


def _loss_order(losses) -> list:
    paper = [canonical_loss(l) for l in PAPER_ORDER]
    return [l for l in paper if l in losses] + sorted(l for l in losses if l not in paper)


def _mean_std(values) -> tuple:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def published(setup: dict, noise: str, loss: str, rate: float, source: str = "ma"):
    """(mean, std) published by ``source`` (paper_results.SOURCES; std None where
    it prints none) for a cell, from its table of the setup's data set (CIFAR-10
    or CIFAR-100, never the other's), or None."""
    dataset = setup.get("dataset", "cifar10")
    base = noise.split("-")[0]
    loss = loss.partition(" (")[0]
    for name in (loss, "sce" if loss == "ce+rce" else None):
        if name is not None:
            entry = published_entry(base, name, rate, dataset, source)
            if entry is not None:
                return entry
    return None


def published_cell(setup: dict, noise: str, loss: str, rate: float) -> dict:
    """{source: (mean, std)} of every source with a number for the cell."""
    cell = {source: published(setup, noise, loss, rate, source) for source in SOURCES}
    return {source: entry for source, entry in cell.items() if entry is not None}


def _published_text(entries: dict) -> str:
    """" [Ma 89.22; ε-softmax 88.41 ± 0.24]", or "" when no source has the cell."""
    parts = [f"{SOURCES[s]['label']} {mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
             for s, (mean, std) in entries.items()]
    return f" [{'; '.join(parts)}]" if parts else ""


def _row_names(runs: list) -> dict:
    """{id(run): row name}: the canonical loss name, plus the parameters that
    tell apart runs of the same loss with other parameters in one table."""
    params = defaultdict(dict)
    for run in runs:
        spec = {k: v for k, v in identity(run)["loss"].items() if k != "name"}
        params[identity(run)["loss"]["name"]][json.dumps(spec, sort_keys=True)] = spec
    names = {}
    for run in runs:
        loss = identity(run)["loss"]
        variants = list(params[loss["name"]].values())
        differing = sorted(k for k in variants[0] if len({json.dumps(v.get(k)) for v in variants}) > 1)
        names[id(run)] = loss["name"] + (" (" + ", ".join(f"{k}={loss[k]:g}" if isinstance(loss[k], float)
                                                          else f"{k}={loss[k]}" for k in differing) + ")"
                                         if differing else "")
    return names


def groups(runs: list) -> dict:
    """{(noise, setup label): [runs]}."""
    out = defaultdict(list)
    for run in runs:
        out[(noise_label(run), setup_label(run))].append(run)
    return out


def accuracy_tables(runs: list) -> dict:
    """{(noise, setup): {"rates", "losses", "setup", "deviations", "cells": {(loss, rate): (mean, std, n)}}}."""
    tables = {}
    for (noise, label), members in groups(runs).items():
        names = _row_names(members)
        cells = defaultdict(list)
        for run in members:
            cells[(names[id(run)], noise_rate(run))].append(run["final"]["test_acc"])
        setup = setup_of(members[0])
        tables[(noise, label)] = {
            "rates": sorted({rate for _, rate in cells}), "losses": _loss_order({loss for loss, _ in cells}),
            "setup": setup, "deviations": setup["data_deviations"], "runs": members, "names": names,
            "cells": {k: _mean_std(v) for k, v in cells.items()}}
    return tables


def _fmt(cell) -> str:
    mean, std, n = cell
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def title(table: dict, noise: str) -> str:
    words = NOISE_WORDS.get(noise.split("-")[0], noise) + (" (released code's recipe)" if "-official" in noise else "")
    text = f"{setup_words(table['setup'])}, {words} label noise"
    if table["deviations"]:
        text = f"{NOT_OFFICIAL} ({'; '.join(table['deviations'])}): " + text
    return text


def write_table(table: dict, noise: str, setup: str, out: str) -> tuple:
    """CSV (per rate: mean, std, n, then each source's published columns, CSV_COLUMNS)
    and Markdown ("mean ± std (n) [Ma 89.22; ε-softmax 88.41 ± 0.24]") of one table."""
    stem = os.path.join(out, f"table_{noise}_{setup}")
    rates, losses, cells = table["rates"], table["losses"], table["cells"]
    official = not table["deviations"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss", "official_data"] + [f"{r:g}_{field}" for r in rates for field in
                                                ("mean", "std", "n", *(c for s in SOURCES for c in CSV_COLUMNS[s]))])
        for loss in losses:
            row = [loss, "yes" if official else "no: " + "; ".join(table["deviations"])]
            for r in rates:
                mean, std, n = cells.get((loss, r), (None, None, 0))
                row += ["" if mean is None else f"{mean:.2f}", "" if std is None else f"{std:.2f}", n]
                for source in SOURCES:
                    entry = published(table["setup"], noise, loss, r, source) or (None, None)
                    row += ["" if v is None else f"{v:.2f}" for v in entry[:len(CSV_COLUMNS[source])]]
            w.writerow(row)
    mark = "" if official else "†"
    shown = {s for loss in losses for r in rates for s in published_cell(table["setup"], noise, loss, r)}
    lines = [f"**{title(table, noise)}**: last-epoch test accuracy (%), mean ± std over seeds (n runs)"
             + (", published values in brackets, from:" if shown else "."), ""]
    lines += [f"- {SOURCES[s]['label']}: {SOURCES[s]['citation']}." for s in SOURCES if s in shown]
    lines += [""] if shown else []
    if not official:
        lines += [f"† {NOT_OFFICIAL}: these runs used {'; '.join(table['deviations'])}. They are not comparable "
                  f"with the published numbers, which were measured on the official CIFAR release.", ""]
    lines += ["| Loss | " + " | ".join(f"η = {r:g}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    for loss in losses:
        row = []
        for r in rates:
            cell = cells.get((loss, r))
            text = "–" if cell is None else f"{_fmt(cell)}{mark} ({cell[2]})"
            row.append(text + _published_text(published_cell(table["setup"], noise, loss, r)))
        lines.append(f"| {loss_label(loss)} | " + " | ".join(row) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem + ".csv", stem + ".md", "\n".join(lines)


def _colors(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _style():
    import matplotlib
    matplotlib.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
                                "xtick.labelsize": 10, "ytick.labelsize": 10})


def _wrap(text: str, width: int = 90) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def plot_accuracy_vs_rate(table: dict, noise: str, setup: str, path: str) -> None:
    import matplotlib.pyplot as plt
    _style()
    fig, ax = plt.subplots(figsize=(10, 6))
    shown = set()
    for color, loss in zip(_colors(len(table["losses"])), table["losses"]):
        rates = [r for r in table["rates"] if (loss, r) in table["cells"]]
        means = [table["cells"][(loss, r)][0] for r in rates]
        stds = [table["cells"][(loss, r)][1] for r in rates]
        ax.errorbar(rates, means, yerr=stds, marker="o", capsize=3, color=color, label=loss_label(loss))
        for source in SOURCES:
            paper = [(r, published(table["setup"], noise, loss, r, source)) for r in table["rates"]]
            paper = [(r, p[0]) for r, p in paper if p is not None]
            if paper:
                shown.add(source)
                ax.plot(*zip(*paper), color=color, alpha=0.7, **PLOT_STYLES[source])
    ax.set_xticks(table["rates"], [f"{r:g}" for r in table["rates"]])  # only the rates that were run
    ax.set_xlabel("noise rate η")
    ax.set_ylabel("test accuracy (%), last epoch")
    styles = {":": "dotted", "--": "dashed"}
    ax.set_title(_wrap("Test accuracy against noise rate: " + title(table, noise) + "".join(
        f". {styles[PLOT_STYLES[s]['linestyle']].capitalize()} {PLOT_STYLES[s]['marker']}: published "
        f"({SOURCES[s]['short']})" for s in SOURCES if s in shown)))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


CURVE_PANELS = (("test_acc", "test accuracy (%)"), ("clean_acc", "train accuracy (%)\non the clean labels"),
                ("noisy_acc", "train accuracy (%)\non the noisy labels"), ("train_loss", "training loss"))


def plot_learning_curves(table: dict, noise: str, setup: str, path: str) -> None:
    """Per rate (columns), against the epoch, mean over seeds: test accuracy;
    training accuracy on the clean labels and on the noisy ones (when the network
    memorises the noisy labels the first falls while the second climbs); the
    training loss."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    _style()
    curves = defaultdict(list)
    for run in table["runs"]:
        if run["curve"]:
            curves[(table["names"][id(run)], noise_rate(run))].append(run["curve"])
    rates = sorted({r for _, r in curves})
    losses = _loss_order({l for l, _ in curves})
    if not rates:
        return
    fig, axes = plt.subplots(len(CURVE_PANELS), len(rates), figsize=(4.2 * len(rates) + 2.6, 11),
                             squeeze=False, sharex="col", sharey="row")
    for col, rate in enumerate(rates):
        for color, loss in zip(_colors(len(losses)), losses):
            if (loss, rate) not in curves:
                continue
            group = curves[(loss, rate)]
            length = min(len(c) for c in group)
            epochs = [row["epoch"] for row in group[0][:length]]
            for row_i, (field, _) in enumerate(CURVE_PANELS):
                values = [[row.get(field) for row in c[:length]] for c in group]
                if any(v is None for vals in values for v in vals):
                    continue
                axes[row_i][col].plot(epochs, np.mean(values, axis=0), color=color, label=loss_label(loss),
                                      marker="." if length < 10 else None)
        axes[0][col].set_title(f"noise rate η = {rate:g}")
        axes[-1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row_i, (_, label) in enumerate(CURVE_PANELS):
        axes[row_i][0].set_ylabel(label)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="center right")
    fig.suptitle(_wrap("Learning curves: " + title(table, noise), 110))
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epoch_times(runs: list) -> dict:
    """{(model, device_name): {(loss, "backend amp"): median epoch seconds over runs}}.

    A run's epoch time is the median of its epochs after the first (the first
    alone when the run had one epoch)."""
    groups_ = defaultdict(lambda: defaultdict(list))
    for run in runs:
        t = run["timing"]
        seconds = t["median_epoch_s"] if t["median_epoch_s"] is not None else t["first_epoch_s"]
        groups_[(run["model"], run.get("device_name") or run["device"])][
            (canonical_loss(run["loss"]), f"{run['backend']} {run['amp']}")].append(seconds)
    return {k: {kk: float(np.median(v)) for kk, v in g.items()} for k, g in groups_.items()}


def plot_epoch_time(runs: list, path: str) -> dict:
    import matplotlib.pyplot as plt
    _style()
    times = epoch_times(runs)
    fig, axes = plt.subplots(len(times), 1, figsize=(11, 4.8 * len(times)), squeeze=False)
    for ax, ((model, device), cells) in zip(axes[:, 0], sorted(times.items())):
        losses = _loss_order({l for l, _ in cells})
        variants = sorted({v for _, v in cells})
        width = 0.8 / len(variants)
        for i, (color, variant) in enumerate(zip(_colors(len(variants)), variants)):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(losses))]
            ax.bar(xs, [cells.get((l, variant), np.nan) for l in losses], width, color=color, label=variant)
        ax.set_xticks(range(len(losses)), [loss_label(l) for l in losses], rotation=30, ha="right")
        ax.set_ylabel("median epoch time (s)")
        ax.set_title(_wrap(f"Training time per epoch of {model} on {device}, per loss and backend "
                           f"(first epoch left out)"))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(title="backend, AMP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    sections = [f"# Noisy-label results ({len(runs)} runs from {runs_dir})", "",
                "Each table holds runs of one setup: the same settings apart from loss, noise rate and seed.", ""]
    for (noise, setup), table in sorted(accuracy_tables(runs).items()):
        csv_path, md_path, markdown = write_table(table, noise, setup, out)
        written["tables"] += [csv_path, md_path]
        acc_png = os.path.join(out, f"accuracy_vs_rate_{noise}_{setup}.png")
        curves_png = os.path.join(out, f"learning_curves_{noise}_{setup}.png")
        plot_accuracy_vs_rate(table, noise, setup, acc_png)
        plot_learning_curves(table, noise, setup, curves_png)
        written["plots"] += [acc_png, curves_png]
        settings = ", ".join(f"{k} {json.dumps(v)}" for k, v in sorted(table["setup"].items()))
        sections += [markdown, "", f"Setup `{setup}`: {settings}", "",
                     f"![accuracy vs rate]({os.path.basename(acc_png)})",
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
                                            "and PNG plots, one set per setup.")
    p.add_argument("runs", nargs="?", default="runs", help="folder searched for result.json files")
    p.add_argument("--out", default=None, help="output folder (default: <runs>/report)")
    args = p.parse_args(argv)
    written = make_report(args.runs, args.out)
    for path in written["tables"] + written["plots"] + [written["markdown"]]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
