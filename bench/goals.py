"""The performance goals, checked against a results file.

    python -m bench.goals bench/results/nvidia-h200-2026-11-21.json
    python -m bench.goals                  # no measurements: the predictions alone

prints one line per goal: MET / MISSED / NOT MEASURED / N/A, the measured value
and the margin: (value - target) / target in percent, signed so that + means on
the good side of the target (headroom) and - how far short it is.  A goal stated
over many configurations ("everywhere") reports its worst case.  Beside each GPU
goal the roofline's PREDICTED figure (`python -m bench.roofline`,
bench/results/roofline-sm90.json; never a measurement) when it predicts one.
Exit status 0 unless the file is unreadable (missed goals are a finding, not an error).
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


def evaluate(data: dict, predictions: Optional[dict] = None) -> list:
    """The goals as dicts: goal, status (met/missed/not measured/n/a), value, target,
    margin_pct (+ = on the good side), detail, and `predicted` (a line, or None) from the
    roofline's `predictions` (bench.roofline's JSON) when given."""
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
    # Kernel time: the CUDA-graph replay where the run measured one (the eager time at this size is
    # the host's: Python, autograd and launch calls), else the eager time, said so.
    graphed = [r for r in tiny if r.get("graph_ms") is not None]
    timed, key, how = (graphed, "graph_ms", "as a CUDA graph replays it") if graphed else (tiny, "ms", "eager")
    worst = max(timed, key=lambda r: r[key]) if timed else None
    goals.append(_gpu_only(_at_most(
        f"triton {list(TINY)} fwd+bwd <= 10 us", worst and worst[key] * 1e3, 10.0,
        f"worst {_cfg(worst)} of {len(timed)}, {how}" if worst else "no record", " us"), device))
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
    predicted = _predicted(predictions)
    for goal in goals:
        goal["predicted"] = predicted(goal["goal"])
    return goals


def _predicted(predictions: Optional[dict]):
    """goal name -> a PREDICTED figure (a line) from bench.roofline's records, or None."""
    records = (predictions or {}).get("records") or []

    def find(**match):
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def pct(backend, loss):
        found = find(backend=backend, loss=loss, dtype="bf16", B=BIG[0], K=BIG[1])
        if not found:
            return None
        r = found[0]
        low = r.get("predicted_pct_copy_static", r["predicted_pct_copy"])
        serial = r.get("predicted_pct_copy_serial_passes", r["predicted_pct_copy"])
        serial = f"; {serial:.1f}% if a row's passes do not overlap" if serial < min(low, r["predicted_pct_copy"]) else ""
        latency = r.get("predicted_pct_copy_latency")
        if latency is not None and latency < min(low, r["predicted_pct_copy"]):
            serial += f"; {latency:.1f}% with each load's latency exposed (calibrated on the H200)"
        if low != r["predicted_pct_copy"]:   # CUDA: run-time loss terms, a range of instruction counts
            return (f"predicted {low:.1f}-{r['predicted_pct_copy']:.1f}% ({r['sass_per_element_static']:.0f} to "
                    f"{r['sass_per_element']:.0f} SASS instructions per element{serial})")
        return (f"predicted {r['predicted_pct_copy']:.1f}% ({r['bound']}-bound, {r['sass_per_element']:.0f} SASS "
                f"instructions per element{serial})")

    def memory():
        if not records:
            return None
        worst = max(records, key=lambda r: r["extra_mem_ratio"])
        return f"predicted {worst['extra_mem_ratio']:.2f}x (worst: {worst['backend']} {worst['loss']} " \
               f"[{worst['B']},{worst['K']}] {worst['dtype']})"

    def tiny_launches():
        found = find(backend="triton", B=TINY[0], K=TINY[1])
        if not found:
            return None
        worst = max(found, key=lambda r: r["launches_check_targets_false"])
        return (f"predicted {worst['launches_check_targets_false']} launches with check_targets=False, "
                f"{worst['launches']} and {worst['host_syncs']} host sync with default arguments")

    def tiny_time():
        found = find(backend="triton", B=TINY[0], K=TINY[1])
        if not found:
            return None
        worst = max(found, key=lambda r: r["predicted_us"])
        return f"predicted {worst['predicted_us']:.2f} us of kernel time (launch overheads not modelled)"

    def cuda_vs_triton():
        ratios = []
        for r in find(backend="cuda"):
            other = find(backend="triton", loss=r["loss"], dtype=r["dtype"], B=r["B"], K=r["K"])
            if other:
                ratios.append((other[0]["predicted_us"] / r["predicted_us"], r))
        if not ratios:
            return None
        ratio, r = min(ratios, key=lambda x: x[0])
        return f"predicted worst triton/cuda time {ratio:.2f}x at {r['loss']} [{r['B']},{r['K']}] {r['dtype']}"

    table = {
        "peak extra memory of fused fwd+bwd <= 1.1x logits size": memory,
        f"triton nce+rce bf16 {list(BIG)} fwd+bwd >= 85% of copy bandwidth": lambda: pct("triton", "nce+rce"),
        f"triton nce+mae bf16 {list(BIG)} fwd+bwd >= 85% of copy bandwidth": lambda: pct("triton", "nce+mae"),
        f"triton nfl+rce bf16 {list(BIG)} fwd+bwd >= 70% of copy bandwidth": lambda: pct("triton", "nfl+rce"),
        f"triton {list(TINY)} fwd+bwd <= 2 launches": tiny_launches,
        f"triton {list(TINY)} fwd+bwd <= 10 us": tiny_time,
        f"cuda nce+rce bf16 {list(BIG)} fwd+bwd >= 90% of copy bandwidth": lambda: pct("cuda", "nce+rce"),
        "cuda never > 10% slower than triton (fwd, fwd+bwd)": cuda_vs_triton,
    }
    return lambda name: table[name]() if name in table else None


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
    predicted = f" | {goal['predicted']}" if goal.get("predicted") else ""
    return f"{status:<13} {goal['goal']} -- {goal['detail']}{margin}{predicted}"


def print_goals(data: dict, file=sys.stdout, predictions: Optional[dict] = None) -> list:
    goals = evaluate(data, predictions)
    print(f"Goals ({data['meta'].get('gpu')}, {data['meta'].get('date')}):", file=file)
    if predictions:
        print(f"After '|': {predictions['meta']['what']} (bench.roofline; toolchains "
              f"{', '.join(predictions['meta']['toolchains'].values())})", file=file)
    for goal in goals:
        print("  " + format_goal(goal), file=file)
    return goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.goals",
        description="Check a results JSON (from bench.kernels / bench.epochs) against the performance goals: "
                    "one line per goal, MET/MISSED/NOT MEASURED/N/A with the measured value and the margin.")
    parser.add_argument("results", nargs="?",
                        help="path of a results JSON, e.g. bench/results/nvidia-h200-<date>.json (none: only the "
                             "predictions)")
    parser.add_argument("--predictions", default=roofline_results(),
                        help="bench.roofline's PREDICTED figures shown beside the GPU goals (default %(default)s; "
                             "'' for none)")
    args = parser.parse_args(argv)
    if args.results is None:
        data = {"meta": {"gpu": "no measurements", "date": "predictions only", "device": "cuda"}, "records": []}
    else:
        data = load_results(args.results)
        if data is None:
            print(f"cannot read a results file at {args.results}", file=sys.stderr)
            return 2
        problems = validate_results(data)
        if problems:
            print("warning: format problems: " + "; ".join(problems[:5]), file=sys.stderr)
    predictions = load_results(args.predictions) if args.predictions else None
    if args.predictions and predictions is None:
        print(f"note: no predictions at {args.predictions} (python -m bench.roofline writes them)", file=sys.stderr)
    print_goals(data, predictions=predictions)
    return 0


def roofline_results() -> str:
    """Where bench.roofline writes its PREDICTED figures."""
    from .roofline import DEFAULT_OUT
    return DEFAULT_OUT


if __name__ == "__main__":
    sys.exit(main())
