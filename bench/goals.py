"""The performance goals, checked against a results file.

    python -m bench.goals bench/results/nvidia-h200-2026-11-21.json

prints one line per goal: MET / MISSED / NOT MEASURED / N/A, the measured value
and the margin: (value - target) / target in percent, signed so that + means on
the good side of the target (headroom) and - how far short it is.  A goal stated
over many configurations ("everywhere") reports its worst case.  Exit status 0
unless the file is unreadable (missed goals are a finding, not an error).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .common import load_results, validate_results

ROBUST_PAIRS_EPOCH_MODEL = "cnn8"
BIG = (8192, 131072)
TINY = (128, 10)
CPU_GOAL_SHAPE = (4096, 1000)


def _kernels(records, **match):
    out = []
    for r in records:
        if r.get("kind") != "kernel" or r.get("ms") is None:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def _one(records, **match) -> Optional[dict]:
    found = _kernels(records, **match)
    return found[0] if found else None


def _goal(name, status, value=None, target=None, margin=None, detail=""):
    return {"goal": name, "status": status, "value": value, "target": target,
            "margin_pct": None if margin is None else round(100 * margin, 1), "detail": detail}


def _at_least(name, value, target, detail, unit=""):
    if value is None:
        return _goal(name, "not measured", detail=detail)
    margin = (value - target) / target if target else None
    return _goal(name, "met" if value >= target else "missed", round(value, 4), target, margin,
                 f"{detail}: {_num(value, unit)}{unit} vs >= {target:g}{unit}")


def _at_most(name, value, target, detail, unit=""):
    if value is None:
        return _goal(name, "not measured", detail=detail)
    margin = (target - value) / target if target else None
    return _goal(name, "met" if value <= target else "missed", round(value, 4), target, margin,
                 f"{detail}: {_num(value, unit)}{unit} vs <= {target:g}{unit}")


def _num(value, unit: str) -> str:
    return f"{value:.2f}" if unit in ("x", "%") else f"{value:.3g}"


def _gpu_only(goal: dict, device: str) -> dict:
    if device != "cuda" and goal["status"] != "not measured":
        goal = dict(goal)
        goal["status"] = "n/a"
        goal["detail"] += " (a GPU goal; this file is a CPU run)"
    return goal


def _cfg(r) -> str:
    return f"{r['loss']} [{r['B']},{r['K']}] {r['dtype']} {r['pass']}"


def evaluate(data: dict) -> list:
    """The goals as dicts: goal, status (met/missed/not measured/n/a), value, target,
    margin_pct (+ = on the good side), detail."""
    records = data["records"]
    device = data["meta"].get("device") or ("cpu" if "CPU" in str(data["meta"].get("gpu")) else "cuda")
    goals = []

    # --- epoch goals (H200, cnn8, batch 128, AMP bf16)
    epochs = [r for r in records if r.get("kind") == "epoch" and r.get("model") == ROBUST_PAIRS_EPOCH_MODEL
              and r.get("amp") == "bf16" and r.get("backend") == "auto"]
    pairs = [r for r in epochs if "+" in r["loss"] and r.get("speedup_vs_reference") is not None]
    worst = min(pairs, key=lambda r: r["speedup_vs_reference"]) if pairs else None
    goals.append(_gpu_only(_at_least(
        "epoch speedup auto/reference, cnn8, bs128, AMP bf16, every robust pair >= 1.10x",
        worst and worst["speedup_vs_reference"], 1.10,
        f"worst {worst['loss']} of {len(pairs)} pairs" if worst else "no epoch records", "x"), device))
    slowest = max(epochs, key=lambda r: r["epoch_s_median"]) if epochs else None
    settings = data["meta"].get("epoch_settings") or {}
    steps = settings.get("steps_per_epoch")
    partial = f", epochs of {steps} steps, not full CIFAR epochs" if steps is not None and steps < 390 else ""
    goals.append(_gpu_only(_at_most(
        "epoch time, auto backend, cnn8, bs128, AMP bf16 < 1.0 s",
        slowest and slowest["epoch_s_median"], 1.0,
        f"slowest {slowest['loss']} of {len(epochs)} losses{partial}" if slowest else "no epoch records", " s"),
        device))

    # --- memory of the fused fwd+bwd (all devices)
    fused = [r for r in records if r.get("kind") == "kernel" and r.get("backend") in ("cpu", "cuda", "triton")
             and r.get("pass") == "fwd+bwd" and r.get("peak_mem_ratio") is not None]
    worst = max(fused, key=lambda r: r["peak_mem_ratio"]) if fused else None
    goals.append(_at_most(
        "peak extra memory of fused fwd+bwd <= 1.1x logits size",
        worst and worst["peak_mem_ratio"], 1.1,
        f"worst {worst['backend']} {_cfg(worst)} of {len(fused)}" if worst else "no fused fwd+bwd records", "x"))

    # --- Triton
    for loss, target in (("nce+rce", 85.0), ("nce+mae", 85.0), ("nfl+rce", 70.0)):
        r = _one(records, backend="triton", loss=loss, B=BIG[0], K=BIG[1], dtype="bf16", **{"pass": "fwd+bwd"})
        goals.append(_gpu_only(_at_least(
            f"triton {loss} bf16 {list(BIG)} fwd+bwd >= {target:g}% of copy bandwidth",
            r and r["pct_copy_bw"], target, "measured" if r else "no record", "%"), device))
    tiny = _kernels(records, backend="triton", B=TINY[0], K=TINY[1], **{"pass": "fwd+bwd"})
    launches = [r for r in tiny if r.get("launches") is not None]
    worst = max(launches, key=lambda r: r["launches"]) if launches else None
    goals.append(_gpu_only(_at_most(
        f"triton {list(TINY)} fwd+bwd <= 2 launches", worst and worst["launches"], 2,
        f"worst {_cfg(worst)} of {len(launches)}" if worst else "no record"), device))
    worst = max(tiny, key=lambda r: r["ms"]) if tiny else None
    goals.append(_gpu_only(_at_most(
        f"triton {list(TINY)} fwd+bwd <= 10 us", worst and worst["ms"] * 1e3, 10.0,
        f"worst {_cfg(worst)} of {len(tiny)}" if worst else "no record", " us"), device))
    goals.append(_gpu_only(_ratio_everywhere(
        records, "triton >= 2x faster than compiled reference everywhere (fwd, fwd+bwd)",
        "triton", "compiled", 2.0, passes=("fwd", "fwd+bwd")), device))
    goals.append(_gpu_only(_ratio_everywhere(
        records, "triton ce at least as fast as F.cross_entropy (fwd, fwd+bwd)",
        "triton", "F.cross_entropy", 1.0, passes=("fwd", "fwd+bwd"), losses=("ce",)), device))

    # --- CUDA
    r = _one(records, backend="cuda", loss="nce+rce", B=BIG[0], K=BIG[1], dtype="bf16", **{"pass": "fwd+bwd"})
    goals.append(_gpu_only(_at_least(
        f"cuda nce+rce bf16 {list(BIG)} fwd+bwd >= 90% of copy bandwidth",
        r and r["pct_copy_bw"], 90.0, "measured" if r else "no record", "%"), device))
    goals.append(_gpu_only(_cuda_fastest_small_k(records), device))
    goals.append(_gpu_only(_ratio_everywhere(
        records, "cuda never > 10% slower than triton (fwd, fwd+bwd)", "cuda", "triton", 1 / 1.1,
        passes=("fwd", "fwd+bwd")), device))

    # --- CPU (foundation section 9)
    for loss in ("nce+rce", "nfl+rce"):
        for other, target in (("reference", 5.0), ("compiled", 3.0)):
            goals.append(_ratio_one(records, loss, other, target))
    return goals


def _ratio_everywhere(records, name, fast, slow, target, *, passes, losses=None):
    """min over shared configs of slow_ms / fast_ms >= target."""
    worst = None
    count = 0
    for r in _kernels(records, backend=fast):
        if r["pass"] not in passes or (losses and r["loss"] not in losses):
            continue
        other = _one(records, backend=slow, loss=r["loss"], B=r["B"], K=r["K"], dtype=r["dtype"],
                     **{"pass": r["pass"]})
        if other is None:
            continue
        count += 1
        ratio = other["ms"] / r["ms"]
        if worst is None or ratio < worst[0]:
            worst = (ratio, r)
    if worst is None:
        return _goal(name, "not measured", detail=f"no configuration with both {fast} and {slow}")
    return _at_least(name, worst[0], round(target, 4), f"worst {_cfg(worst[1])} of {count}, {slow}/{fast} time",
                     "x")


def _cuda_fastest_small_k(records):
    name = "cuda fastest backend at K <= 1000 (fwd+bwd)"
    worst = None
    count = 0
    for r in _kernels(records, backend="cuda", **{"pass": "fwd+bwd"}):
        if r["K"] > 1000:
            continue
        others = [o for o in _kernels(records, loss=r["loss"], B=r["B"], K=r["K"], dtype=r["dtype"],
                                      **{"pass": "fwd+bwd"}) if o["backend"] != "cuda"]
        if not others:
            continue
        count += 1
        best = min(others, key=lambda o: o["ms"])
        ratio = best["ms"] / r["ms"]
        if worst is None or ratio < worst[0]:
            worst = (ratio, r, best["backend"])
    if worst is None:
        return _goal(name, "not measured", detail="no cuda record at K <= 1000")
    return _at_least(name, worst[0], 1.0,
                     f"worst {_cfg(worst[1])} of {count}, fastest other ({worst[2]}) time / cuda time", "x")


def _ratio_one(records, loss, other, target):
    B, K = CPU_GOAL_SHAPE
    name = f"cpu {loss} fp32 [{B},{K}] fwd+bwd >= {target:g}x faster than {other}"
    mine = _one(records, backend="cpu", loss=loss, B=B, K=K, dtype="fp32", **{"pass": "fwd+bwd"})
    theirs = _one(records, backend=other, loss=loss, B=B, K=K, dtype="fp32", **{"pass": "fwd+bwd"})
    if mine is None or theirs is None:
        return _goal(name, "not measured", detail=f"needs cpu and {other} records")
    return _at_least(name, theirs["ms"] / mine["ms"], target,
                     f"{other} {theirs['ms']:.3g} ms / cpu {mine['ms']:.3g} ms", "x")


def format_goal(goal: dict) -> str:
    """One line; the margin is (value - target) / target, signed so that + is on the good side."""
    status = goal["status"].upper()
    margin = ""
    if goal["margin_pct"] is not None and goal["status"] in ("met", "missed", "n/a"):
        pct = goal["margin_pct"]
        margin = f" ({pct:+.1f}%: {'headroom' if pct >= 0 else 'short of the target'})"
    return f"{status:<13} {goal['goal']} -- {goal['detail']}{margin}"


def print_goals(data: dict, file=sys.stdout) -> list:
    goals = evaluate(data)
    print(f"Goals ({data['meta'].get('gpu')}, {data['meta'].get('date')}):", file=file)
    for goal in goals:
        print("  " + format_goal(goal), file=file)
    return goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.goals",
        description="Check a results JSON (from bench.kernels / bench.epochs) against the performance goals: "
                    "one line per goal, MET/MISSED/NOT MEASURED/N/A with the measured value and the margin.")
    parser.add_argument("results", help="path of a results JSON, e.g. bench/results/nvidia-h200-<date>.json")
    args = parser.parse_args(argv)
    data = load_results(args.results)
    if data is None:
        print(f"cannot read a results file at {args.results}", file=sys.stderr)
        return 2
    problems = validate_results(data)
    if problems:
        print("warning: format problems: " + "; ".join(problems[:5]), file=sys.stderr)
    print_goals(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
