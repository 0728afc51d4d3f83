"""The compression benchmark's latency pass: every compact model of a (model, budget) timed in one window.

A latency measured inside each run depends on whatever else the machine did at that moment (on our 2-core
machine the same VGG-BN compact model read 0.7 ms or 144 ms at batch 1), so the runs keep their compact models
and this pass times them afterwards: per (model, budget kind, budget), the base and every kept compact model,
interleaved (`training.compare_latency`, and ONNX Runtime's `export.compare_onnx_latency` where it is installed),
at batch 1 and 64. Each record gets `latency`: its medians, its speed-up over the base timed in the same window,
and the machine and commit of the pass. Latency depends on the shapes only, so one base stands for every seed.
"""

from __future__ import annotations

import os
import time

from gpp_ext.training import compare_latency

BATCHES = (1, 64)


def _name(record) -> str:
    return f"{record['method']}/seed{record['seed']}"


def _entry(timings: dict, name: str) -> dict:
    out = {}
    for batch in BATCHES:
        t = timings[f"b{batch}"]
        out[f"b{batch}_ms"] = t[name]["median_ms"]
        out[f"speedup_b{batch}"] = t["base"]["median_ms"] / max(t[name]["median_ms"], 1e-9)
    return out


def _time(models: dict, input_shape, rounds: int, repeats: int, onnx: bool) -> dict:
    eager = {f"b{b}": compare_latency(models, input_shape, b, rounds=rounds, repeats=repeats) for b in BATCHES}
    if not onnx:
        return {"eager": eager}
    from gpp_ext.export import compare_onnx_latency

    return {"eager": eager, "onnxruntime": compare_onnx_latency(models, input_shape, BATCHES, rounds=rounds,
                                                                repeats=repeats)}


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def latency_pass(records: list, load_compact, load_base, input_shape_of, machine: str, commit: str,
                 rounds: int = 5, repeats: int = 10, onnx: bool | None = None, save=None, log=print) -> int:
    """Times the compact model of every record that has one (`load_compact(record)` returns it or None), group
    by group, against `load_base(model name)`; writes `record["latency"]` and calls `save(records)` after each
    group. Returns the number of records timed. Records whose compact model is gone keep what they had."""
    onnx = onnx_available() if onnx is None else onnx
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r.get("budget_kind", "params"), r["budget"]), []).append(r)
    timed = 0
    for (model, kind, budget), rs in sorted(groups.items()):
        compact = {}
        for r in rs:
            m = load_compact(r)
            if m is not None:
                compact[_name(r)] = (r, m)
        if not compact:
            log(f"  latency {model} {kind} {budget:g}: no compact model kept, skipped")
            continue
        started = time.perf_counter()
        models = {"base": load_base(model), **{n: m for n, (_, m) in compact.items()}}
        timings = _time(models, input_shape_of(model), rounds, repeats, onnx)
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        for n, (r, _) in compact.items():
            r["latency"] = {"eager": _entry(timings["eager"], n), "machine": machine, "commit": commit, "when": when,
                            "models_in_window": len(models), "rounds": rounds, "repeats": repeats,
                            "base_ms": {f"b{b}": timings["eager"][f"b{b}"]["base"]["median_ms"] for b in BATCHES}}
            if "onnxruntime" in timings:
                r["latency"]["onnxruntime"] = _entry(timings["onnxruntime"], n)
        timed += len(compact)
        if save is not None:
            save(records)
        log(f"  latency {model} {kind} {budget:g}: {len(compact)} compact model(s) and the base in one window "
            f"({time.perf_counter() - started:.0f} s)")
    return timed


def compact_loader(path_of, rebuild=None):
    """`load_compact` for `latency_pass`: the model at `path_of(record)`; when it was not kept (a fresh checkout:
    the compact models live in the run cache), `rebuild(record)` (e.g. `from_widths`), else None."""
    from gpp_ext import io

    def load(record):
        path = path_of(record)
        if os.path.exists(path):
            return io.load(path)
        return rebuild(record) if rebuild is not None else None

    return load


def from_widths(base, record: dict, example, log=print):
    """The compact model's architecture rebuilt from the base and the record's `widths` (`{group: [before,
    after]}`): each group cut to its first `after` channels of the base's weights. Latency depends on the shapes
    only, so this times as the kept model did. None (with a line saying why) when the record has no widths, they
    name groups the base lacks, or the rebuilt model's parameters differ from the record's (a method that also
    removed blocks: its depth is not in the widths)."""
    import copy

    import torch

    from gpp_ext.cost import count_params
    from gpp_ext.pruning import ChannelGraph

    widths = record.get("widths")
    what = f"{record['method']}/seed{record['seed']} at {record.get('budget_kind', 'params')} {record['budget']:g}"
    if not widths:
        log(f"  latency: {what} has no widths and no kept model; not timed")
        return None
    model = copy.deepcopy(base).eval()
    graph = ChannelGraph(model, example)
    sizes = {g.name: g.size for g in graph.groups}
    if any(name not in sizes or sizes[name] != before for name, (before, _) in widths.items()):
        log(f"  latency: {what}: its widths do not fit the base's groups; not timed")
        return None
    graph.prune({name: torch.arange(after) for name, (before, after) in widths.items() if after < before})
    if count_params(model) != record["params"]:
        log(f"  latency: {what}: rebuilt from its widths it has {count_params(model):,} parameters, not the "
            f"{record['params']:,} recorded (blocks removed?); not timed")
        return None
    return model
