"""The output folder of a run: `report.json`, `report.md` (a table a person reads), `progress.png` (accuracy
against parameters across iterations) and `model.pt` (the compact model, `gpp_ext.io` format)."""

from __future__ import annotations

import json
import os

from . import io

__all__ = ["write_reports", "render_markdown", "summary_table"]


def _speed(before: float, after: float) -> str:
    ratio = before / after
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def summary_table(report: dict) -> str:
    """Base against compact: parameters, FLOPs, test accuracy, CPU latency (batch 1 and 64)."""
    base, final = report["base"], report["final"]
    rows = [("params", f"{base['params']:,}", f"{final['params']:,}", f"{final['params'] / base['params']:.1%}"),
            ("FLOPs", f"{base['flops']:,}", f"{final['flops']:,}", f"{final['flops'] / base['flops']:.1%}"),
            ("test accuracy", f"{base['test_accuracy']:.4f}", f"{final['test_accuracy']:.4f}",
             f"{final['test_accuracy'] - base['test_accuracy']:+.4f}"),
            ("latency b=1 (ms)", f"{base['latency_ms_b1']:.3f}", f"{final['latency_ms_b1']:.3f}",
             _speed(base["latency_ms_b1"], final["latency_ms_b1"])),
            ("latency b=64 (ms)", f"{base['latency_ms_b64']:.2f}", f"{final['latency_ms_b64']:.2f}",
             _speed(base["latency_ms_b64"], final["latency_ms_b64"]))]
    lines = ["| | base | compact | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    lines = [f"# Grow-push-prune on {report['dataset']}", "", summary_table(report), "",
             f"Stopped: {report['stopped']}. Input shape {report['input_shape']}, {report['num_classes']} classes, "
             f"{report['seconds']:.0f} s.", "", "## Iterations", "",
             "| # | eta / goal | params | FLOPs | val acc end of push | val acc after prune | val acc | test acc | "
             "latency b=1 (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for it in report["iterations"]:
        if "params" not in it:
            continue
        goal = next(((k[5:], v) for k, v in it.items() if k.startswith("goal_")), ("params", 0.0))
        knob = f"{it['eta']:.2f}" if it.get("eta") is not None else f"{goal[1]:.1%} {goal[0]}"
        push = it.get("val_accuracy_end_of_push")
        lines.append(f"| {it['iteration']} | {knob} | {it['params']:,} | {it['flops']:,} | "
                     f"{'–' if push is None else f'{push:.4f}'} | {it['val_accuracy_after_prune']:.4f} | {it['val_accuracy']:.4f} | {it['test_accuracy']:.4f} | "
                     f"{it['latency_ms_b1']:.3f} |")
    if report.get("growth"):
        lines += ["", "## Growth", "", "| stage | modules | val acc | params | kept |", "|---:|---:|---:|---:|:---:|"]
        lines += [f"| {g['stage']} | {g['modules']} | {g['accuracy']:.4f} | {g['params']:,} | "
                  f"{'yes' if g['kept'] else 'no'} |" for g in report["growth"]]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [it for it in report["iterations"] if "params" in it]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([report["base"]["params"]] + [it["params"] for it in its],
            [report["base"]["test_accuracy"]] + [it["test_accuracy"] for it in its], "o-", label="GPP iterations")
    ax.plot([report["base"]["params"]], [report["base"]["test_accuracy"]], "s", color="black", label="base")
    ax.plot([report["final"]["params"]], [report["final"]["test_accuracy"]], "*", markersize=14, color="tab:red",
            label="final")
    for peer in report.get("peers", []):
        ax.plot([peer["params"]], [peer["test_accuracy"]], "x", label=peer["method"])
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{report['dataset']}: accuracy vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        io.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_reports(report: dict, out_dir: str, model=None) -> None:
    """Writes report.json, report.md, progress.png (and model.pt when `model` is given), each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    io.write_text_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    io.write_text_atomic(os.path.join(out_dir, "report.md"), render_markdown(report))
    _plot(report, os.path.join(out_dir, "progress.png"))
    if model is not None:
        io.save(model, os.path.join(out_dir, "model.pt"))
