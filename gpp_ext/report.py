"""The output folder of a run: `report.json`, `report.md` (a table a person reads), `progress.png` (accuracy
against parameters across iterations) and `model.pt` (the compact model, `gpp_ext.io` format)."""

from __future__ import annotations

import json
import math
import os

from . import io

__all__ = ["write_reports", "render_markdown", "summary_table", "read_report", "verdicts"]

# What `summary_table` and `gpp report` read; a report without one of them is refused with its name.
REQUIRED = {"base": ("params", "flops", "test_accuracy"), "final": ("params", "flops", "test_accuracy"),
            "stopped": (), "iterations": (), "seconds": ()}


def _speed(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _change(ratio: dict) -> str:
    """A speed-up's median with its range over the rounds, both in the direction the median reads."""
    low, high = ratio["min"], ratio["max"]
    spread = f"{low:.2f}-{high:.2f}x" if ratio["median"] >= 1 else f"{1 / high:.2f}-{1 / low:.2f}x"
    return f"{_speed(ratio['median'])} ({spread})"


def _timed_row(label: str, t: dict, digits: int) -> tuple:
    """A row of base and compact timed interleaved: each one's median, the speed-up's median and range, and a
    warning when the rounds disagree (older reports carry no "reliable" flag for ONNX Runtime)."""
    change = _change(t["ratio"])
    if not t["ratio"].get("reliable", True):
        change += "; unreliable: the machine was busy, the rounds disagree"
    apart = t["base"]["median_ms"] / max(t["compact"]["median_ms"], 1e-12)
    if apart > 0 and abs(math.log(apart / t["ratio"]["median"])) > math.log(1.05):  # they disagree by over 5%
        change += f"; the medians' ratio: {_speed(apart)}"
    return (label, f"{t['base']['median_ms']:.{digits}f}", f"{t['compact']['median_ms']:.{digits}f}", change)


def _latency_rows(report: dict) -> list:
    """Latency rows: eager PyTorch from the interleaved timing of base and compact (`report["latency"]`), else
    from the per-model figures measured at different moments (older reports); then ONNX Runtime's
    (`report["onnx_latency"]`) when it was measured."""
    rows = []
    timed = report.get("latency") or {}
    for batch, digits in ((1, 3), (64, 2)):
        t = timed.get(f"b{batch}")
        if t:
            rows.append(_timed_row(f"latency b={batch} (ms)", t, digits))
            continue
        key = f"latency_ms_b{batch}"
        if key in report["base"] and key in report["final"]:
            before, after = report["base"][key], report["final"][key]
            rows.append((f"latency b={batch} (ms)", f"{before:.{digits}f}", f"{after:.{digits}f}",
                         _speed(before / max(after, 1e-12)) + " (timed apart)"))
    onnx = report.get("onnx_latency") or {}
    rows += [_timed_row(f"ONNX Runtime b={batch} (ms)", onnx[f"b{batch}"], digits)
             for batch, digits in ((1, 3), (64, 2)) if onnx.get(f"b{batch}")]
    return rows


def summary_table(report: dict) -> str:
    """Base against compact: parameters, FLOPs, test accuracy, CPU latency (batch 1 and 64) in eager PyTorch
    and, when it was measured, in ONNX Runtime."""
    base, final = report["base"], report["final"]
    rows = [("params", f"{base['params']:,}", f"{final['params']:,}", f"{final['params'] / base['params']:.1%}"),
            ("FLOPs", f"{base['flops']:,}", f"{final['flops']:,}", f"{final['flops'] / base['flops']:.1%}"),
            ("test accuracy", f"{base['test_accuracy']:.4f}", f"{final['test_accuracy']:.4f}",
             f"{final['test_accuracy'] - base['test_accuracy']:+.4f}")]
    if _is_number(base.get("latency")) and _is_number(final.get("latency")) and base["latency"] > 0:
        config = report.get("config") or {}
        where = f"{config.get('latency_runtime', 'eager')} b={config.get('latency_batch', 1)}"
        rows.append((f"latency budget, {where} (ms, per-layer table)", f"{base['latency']:.3f}",
                     f"{final['latency']:.3f}", f"{final['latency'] / base['latency']:.1%}"))
    rows += _latency_rows(report)
    lines = ["| | base | compact | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if any((report.get(key) or {}).get(f"b{batch}") for key in ("latency", "onnx_latency") for batch in (1, 64)):
        lines += ["", "Latencies: base and compact timed in alternating rounds; each column is a model's median "
                      "over the rounds, the change the median of the per-round speed-ups (what a busy machine "
                      "disturbs least; it can differ from the ratio of the two medians)."]
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _timing_errors(t, where: str) -> list:
    """The fields of one interleaved timing (`{"base": {"median_ms"}, "compact": {...}, "ratio": {...}}`) that
    the summary reads, where they are missing or not numbers."""
    if not isinstance(t, dict):
        return [f"{where} is {type(t).__name__}, not an object"]
    out = []
    for model in ("base", "compact"):
        if not isinstance(t.get(model), dict) or not _is_number(t[model].get("median_ms")):
            out.append(f"{where}.{model}.median_ms is not a number")
    ratio = t.get("ratio")
    if not isinstance(ratio, dict) or not all(_is_number(ratio.get(k)) and ratio[k] > 0
                                              for k in ("median", "min", "max")):
        out.append(f"{where}.ratio needs positive numbers median, min and max")
    return out


def _wrong_types(report: dict) -> list:
    """`["field: what is wrong", ...]` for every field `summary_table` and `gpp report` read whose type is wrong
    (e.g. `seconds: null`, `iterations: 3`), so that a damaged report gives a message, not a TypeError."""
    out = []
    for key in ("base", "final"):
        part = report[key]
        if not isinstance(part, dict):
            out.append(f"{key} is {type(part).__name__}, not an object")
            continue
        for field in ("params", "flops"):
            if not _is_count(part.get(field)) or (key == "base" and part[field] == 0):
                out.append(f"{key}.{field} is {part.get(field)!r}, not a count")
        if not _is_number(part.get("test_accuracy")):
            out.append(f"{key}.test_accuracy is {part.get('test_accuracy')!r}, not a number")
        for batch in (1, 64):
            value = part.get(f"latency_ms_b{batch}")
            if value is not None and not _is_number(value):
                out.append(f"{key}.latency_ms_b{batch} is {value!r}, not a number")
    if not isinstance(report["stopped"], str):
        out.append(f"stopped is {report['stopped']!r}, not text")
    if not isinstance(report["iterations"], list) or not all(isinstance(i, dict) for i in report["iterations"]):
        out.append(f"iterations is {type(report['iterations']).__name__}, not a list of objects")
    if not _is_number(report["seconds"]):
        out.append(f"seconds is {report['seconds']!r}, not a number")
    for key in ("latency", "onnx_latency"):
        timed = report.get(key)
        if timed is None:
            continue
        if not isinstance(timed, dict):
            out.append(f"{key} is {type(timed).__name__}, not an object")
            continue
        for batch in ("b1", "b64"):
            if timed.get(batch):
                out += _timing_errors(timed[batch], f"{key}.{batch}")
    return out


def read_report(folder: str) -> dict:
    """The finished run's report in `folder`, checked: `FileNotFoundError` when there is none (saying so when a
    run is still in progress or was interrupted), `ValueError` saying what is wrong and what to do when it is
    not JSON, lacks a field the summary needs, or belongs to an earlier run than the folder's checkpoint."""
    path = os.path.join(folder, "report.json")
    checkpoint = os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(path):
        if os.path.exists(checkpoint):
            raise FileNotFoundError(f"gpp report: {folder} holds a run that has not finished (a checkpoint, no "
                                    f"report.json); continue it with the same `gpp compress` command and --resume")
        raise FileNotFoundError(f"gpp report: no report.json in {folder}; give the output folder of a finished "
                                f"`gpp compress` run")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"gpp report: cannot read {path} ({error}); it is damaged: run the compression again "
                         f"with --resume (it rewrites the report from the checkpoint)") from error
    if not isinstance(report, dict):
        raise ValueError(f"gpp report: {path} is not a gpp_ext report (a JSON object)")
    missing = [k for k in REQUIRED if k not in report]
    missing += [f"{k}.{f}" for k, fields in REQUIRED.items() if isinstance(report.get(k), dict)
                for f in fields if f not in report[k]]
    if missing:
        raise ValueError(f"gpp report: {path} lacks {', '.join(missing)}; it is not a complete gpp_ext report "
                         f"(written by another tool or an older version?)")
    wrong = _wrong_types(report)
    if wrong:
        raise ValueError(f"gpp report: {path} has fields of the wrong type ({'; '.join(wrong[:4])}); it is damaged "
                         f"or was edited: run the compression again with --resume (it rewrites the report from the "
                         f"checkpoint)")
    if os.path.exists(checkpoint):
        import torch

        try:
            run_id = torch.load(checkpoint, weights_only=True)["state"].get("run_id")
        except Exception:  # a damaged checkpoint does not make the finished report wrong
            run_id = report.get("run_id")
        if run_id != report.get("run_id"):
            raise ValueError(f"gpp report: {path} is from an earlier run than the checkpoint in {folder} (run "
                             f"{report.get('run_id')!r}, checkpoint {run_id!r}); finish the current run with "
                             f"--resume to get its report")
    return report


def verdicts(report: dict) -> list:
    """`[(missed, sentence)]`: what a run missed (the size target, the accuracy floor), and that no floor applied
    when the base was at chance; empty for a run that met both."""
    out = []
    if report.get("target_reached") is False:
        out.append((True, "The compact model missed the size target."))
    if report.get("accuracy_floor_met") is False:
        out.append((True, f"No compact model stayed at or above the accuracy floor ({report['accuracy_floor']:.4f} "
                          f"validation accuracy); this is the most accurate one met."))
    if report.get("no_floor"):
        out.append((False, f"No accuracy floor applied: {report['no_floor']}."))
    return out


def render_markdown(report: dict) -> str:
    skipped = (report.get("onnx_latency") or {}).get("skipped")
    lines = [f"# Grow-push-prune on {report['dataset']}", "", summary_table(report), "",
             f"Stopped: {report['stopped']}. Input shape {report['input_shape']}, {report['num_classes']} classes, "
             f"{report['seconds']:.0f} s." + (f" ONNX Runtime latency not measured: {skipped}." if skipped else "")
             + "".join(f" **{line}**" if missed else f" {line}" for missed, line in verdicts(report)),
             "", "## Iterations", "",
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
                     f"{'–' if push is None else f'{push:.4f}'} | {it['val_accuracy_after_prune']:.4f} | "
                     f"{it['val_accuracy']:.4f} | {it['test_accuracy']:.4f} | "
                     f"{it['latency_ms_b1']:.3f} |")
    if report.get("growth"):
        before, base = report.get("before_growth"), report["base"]
        lines += ["", "## Growth", ""]
        if before:
            lines += [f"Grown from {before['params']:,} parameters and {before['flops']:,} FLOPs (validation "
                      f"accuracy {before.get('val_accuracy', float('nan')):.4f}, test "
                      f"{before['test_accuracy']:.4f}) to the base above: {base['params']:,} parameters, "
                      f"{base['params'] / before['params']:.2f}x; the size targets are fractions of the grown model, "
                      f"and the compact model keeps {report['final']['params'] / before['params']:.1%} of the "
                      f"parameters of the model before growth.", ""]
        lines += ["| step | what was tried | val acc | params | kept |",
                  "|---|---|---:|---:|:---:|"]
        lines += [f"| {_growth_step(g)} | {g['accuracy']:.4f} | {g['params']:,} | {'yes' if g['kept'] else 'no'} |"
                  for g in report["growth"]]
        triaged = report["growth"][0].get("triage")
        if triaged:  # grow_order "triage": the criticality that chose the order
            from .triage import BlockCriticality, triage_table

            lines += ["", f"The stages grew in triage order {report['growth'][0].get('order')}: each block collapsed "
                          f"into a single layer, briefly trained, and the validation accuracy it lost:", "",
                      triage_table([BlockCriticality(**r) for r in triaged]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _growth_step(g: dict) -> str:
    """`step | what was tried` of one growth step: an Inception module (older reports have no method) or a
    planting round."""
    if g.get("method", "inception") == "planting":
        added = ", ".join(f"{name} +{n}" for name, n in g["added"].items()) or "nothing paid"
        return f"planting round {g['round']} | {added if g['round'] else 'the trained model'}"
    return f"stage {g['stage']} | {g['modules']} module{'s' if g['modules'] != 1 else ''}" if g["stage"] >= 0 \
        else "– | the trained model"


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
    """Writes model.pt (when `model` is given), progress.png, report.md and, last, report.json, each atomically:
    report.json is the mark of a finished run, so it never sits beside a model of another run."""
    os.makedirs(out_dir, exist_ok=True)
    if model is not None:
        io.save(model, os.path.join(out_dir, "model.pt"))
    _plot(report, os.path.join(out_dir, "progress.png"))
    io.write_text_atomic(os.path.join(out_dir, "report.md"), render_markdown(report))
    io.write_text_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
