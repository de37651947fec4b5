"""PNG plots of a results file: the kernel records (time and % of copy bandwidth
vs K, per backend) and the epoch records (epoch time per loss, reference vs auto).

    python -m bench.plots bench/results/<name>.json     # writes <name>-time.png, <name>-bw.png, <name>-epochs.png

Kernels: one panel per (dtype, loss); x is K (the shape's B is in the tick
label), solid lines fwd+bwd, dashed fwd.  Epochs: one panel per (model, AMP),
bars of the median epoch time per loss and backend, the speed-up written above
with its min-max over the epochs (meta["epoch_details"]).  matplotlib is imported lazily: without it the
benchmarks still run and say that the plots were skipped.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import BACKENDS, load_results

COLORS = {"reference": "tab:gray", "compiled": "tab:purple", "cpu": "tab:blue", "cuda": "tab:green",
          "triton": "tab:red", "F.cross_entropy": "tab:orange"}


def plot_results(data: dict, stem: str) -> list:
    """Write <stem>-time.png and <stem>-bw.png; returns the paths written ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"plots skipped: matplotlib is not available ({error})")
        return []
    paths = plot_epochs(data, stem, plt)
    kernels = [r for r in data["records"] if r.get("kind") == "kernel" and r.get("ms") is not None]
    if not kernels:
        return paths
    dtypes = sorted({r["dtype"] for r in kernels})
    losses = [l for l in dict.fromkeys(r["loss"] for r in kernels)]
    for metric, ylabel, suffix, log_y in (("ms", "median time (ms)", "time", True),
                                          ("pct_copy_bw", "% of copy bandwidth", "bw", False)):
        fig, axes = plt.subplots(len(dtypes), len(losses), squeeze=False, sharex=True,
                                 figsize=(max(10.0, 3.6 * len(losses) + 1), 3.2 * len(dtypes) + 1.6))
        for i, dtype in enumerate(dtypes):
            for j, loss in enumerate(losses):
                ax = axes[i][j]
                rows = [r for r in kernels if r["dtype"] == dtype and r["loss"] == loss]
                shapes = sorted({(r["K"], r["B"]) for r in rows})
                for backend in BACKENDS:
                    for pass_name, style in (("fwd+bwd", "-"), ("fwd", "--")):
                        pts = sorted((r["K"], r[metric]) for r in rows
                                     if r["backend"] == backend and r["pass"] == pass_name
                                     and r.get(metric) is not None)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3,
                                    color=COLORS.get(backend), label=f"{backend} {pass_name}")
                ax.set_xscale("log")
                if log_y:
                    ax.set_yscale("log")
                ax.set_xticks([k for k, _ in shapes])
                ax.set_xticklabels([f"{b}x{k}" for k, b in shapes], rotation=30, fontsize=7)
                ax.minorticks_off()
                ax.set_title(f"{loss} {dtype}", fontsize=9)
                ax.grid(True, alpha=0.3)
                if j == 0:
                    ax.set_ylabel(ylabel)
        handles, labels = [], []
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        ncol = 4
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
        meta = data["meta"]
        title = (f"{ylabel} vs shape BxK: fwd+bwd solid, fwd dashed\n"
                 f"{meta.get('gpu')}, torch {meta.get('torch')}, {str(meta.get('date'))[:10]}")
        if metric == "pct_copy_bw":
            title += f"\n100% = {meta.get('copy_kind', 'copy bandwidth')}"
        fig.suptitle(title, fontsize=10)
        legend_rows = -(-len(labels) // ncol)
        height = fig.get_figheight()
        fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.2) / height, 1, 1 - 0.6 / height))
        path = f"{stem}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_epochs(data: dict, stem: str, plt) -> list:
    """<stem>-epochs.png from the epoch records ([] when there are none)."""
    epochs = [r for r in data["records"] if r.get("kind") == "epoch" and r.get("epoch_s_median") is not None]
    if not epochs:
        return []
    spreads = {(d["loss"], d["model"], d["amp"]): (d["speedup_min"], d["speedup_max"])
               for d in data["meta"].get("epoch_details", []) if "speedup_min" in d}
    panels = list(dict.fromkeys((r["model"], r["amp"]) for r in epochs))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, 4.5 * len(panels) + 0.8))
    for ax, (model, amp) in zip(axes[:, 0], panels):
        rows = [r for r in epochs if (r["model"], r["amp"]) == (model, amp)]
        losses = list(dict.fromkeys(r["loss"] for r in rows))
        seconds = {(r["loss"], r["backend"]): r["epoch_s_median"] for r in rows}
        for i, backend in enumerate(("reference", "auto")):
            xs = [j + (i - 0.5) * 0.4 for j in range(len(losses))]
            ax.bar(xs, [seconds.get((l, backend), float("nan")) for l in losses], 0.4,
                   color=COLORS["reference"] if backend == "reference" else "tab:blue", label=backend)
        for j, loss in enumerate(losses):
            ref, auto = seconds.get((loss, "reference")), seconds.get((loss, "auto"))
            if ref and auto:
                low, high = spreads.get((loss, model, amp), (None, None))
                text = f"{ref / auto:.2f}x" + (f"\n({low:.2f}-{high:.2f})" if low is not None else "")
                ax.annotate(text, (j, max(ref, auto)), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(losses)), losses, rotation=20)
        ax.set_ylabel("median epoch time (s)")
        ax.set_title(f"{model}, AMP {amp}: training epoch time, reference against auto "
                     f"(speed-up above, min-max over epochs)", fontsize=10)
        ax.margins(y=0.2)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=9)
    meta = data["meta"]
    settings = meta.get("epoch_settings", {})
    fig.suptitle(f"Epoch time per loss on {meta.get('gpu')}, torch {meta.get('torch')}, "
                 f"{str(meta.get('date'))[:10]}; data: {settings.get('data', '?')}, batch "
                 f"{settings.get('batch_size', '?')}; epoch 0 (warm-up) left out", fontsize=10)
    fig.tight_layout()
    path = f"{stem}-epochs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots",
                                     description="Redraw the PNG plots of a results JSON.")
    parser.add_argument("results")
    args = parser.parse_args(argv)
    data = load_results(args.results)
    if data is None:
        print(f"cannot read {args.results}", file=sys.stderr)
        return 2
    paths = plot_results(data, os.path.splitext(args.results)[0])
    if not paths:
        print(f"{args.results} holds no kernel or epoch records to draw", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
