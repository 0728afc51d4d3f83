"""How well the per-layer latency tables predict a cut's latency: predicted against measured, per runtime and
batch size (run it on a quiet machine: every figure is a timing).

    python -m benchmarks.latency_model                      # VGG-BN and ResNet-20, eager and ONNX Runtime, b1/b64
    python -m benchmarks.latency_model --models vgg --runtimes eager --batches 1

For each model, runtime and batch: a fresh `LatencyTable` (its own cache folder, so nothing stale is read), the
`LatencyModel` of the unpruned model, then for each budget the solver's widths for that latency budget (L1
scores), the model cut to them, and the cut and the base timed interleaved in one window
(`training.compare_latency`, `export.compare_onnx_latency`). Records the predicted and the measured share of the
base latency, the seconds the tables took, the machine and the commit: benchmarks/results/latency_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from gpp_ext import models
from gpp_ext.io import write_text_atomic
from gpp_ext.latency import LatencyTable
from gpp_ext.pruning import ChannelGraph, LatencyModel, allocate, criteria
from gpp_ext.pruning.costs import _cut_copy
from gpp_ext.training import compare_latency

from ._meta import git_commit, machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(name: str, runtime: str, batch: int, budgets, rounds: int = 7) -> list:
    torch.manual_seed(0)
    model = models.build(name, in_channels=1, num_classes=10).eval()
    shape = (1, 28, 28)
    graph = ChannelGraph(model, torch.zeros(2, *shape))
    scores = criteria.get("l1")(graph, None)
    out = []
    with tempfile.TemporaryDirectory(prefix="gpp-latency-bench-") as cache:
        started = time.perf_counter()
        table = LatencyTable(runtime, batch, cache=cache)
        latency = LatencyModel(graph, table)
        seconds = time.perf_counter() - started
        for budget in budgets:
            widths = allocate(graph, scores, budget, "latency", "solver", latency=table)
            cut = _cut_copy(graph, widths)
            repeats = 10 if batch == 1 else 3
            if runtime == "eager":
                timed = compare_latency({"base": model, "cut": cut}, shape, batch, rounds=rounds, repeats=repeats)
            else:
                from gpp_ext.export import compare_onnx_latency

                timed = compare_onnx_latency({"base": model, "cut": cut}, shape, (batch,), rounds=rounds,
                                             repeats=repeats)[f"b{batch}"]
            out.append({"model": name, "runtime": runtime, "batch": batch, "budget": budget,
                        "predicted": latency.cost(widths) / latency.cost({}),
                        "measured": timed["cut"]["median_ms"] / timed["base"]["median_ms"],
                        "reliable": timed["ratio"]["reliable"], "base_ms": timed["base"]["median_ms"],
                        "table_seconds": round(seconds, 1), "widths": widths})
            print(f"{name} {runtime} b{batch} {budget:.0%}: predicted {out[-1]['predicted']:.3f}, measured "
                  f"{out[-1]['measured']:.3f}{'' if out[-1]['reliable'] else ' (the rounds disagree)'}",
                  flush=True)
    return out


def render(records: list, meta: dict) -> str:
    lines = ["# Latency tables: predicted against measured", "",
             f"Machine: {meta['machine']}; commit {meta['commit']}; torch {meta['torch']}. Each row: the solver's "
             "widths for a latency budget (L1 scores), predicted by the per-layer tables, then the cut and the base "
             "timed interleaved in one window. `budget` and the two shares are fractions of the base's latency.",
             "", "| model | runtime | batch | budget | predicted | measured | base ms | tables (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['budget']:.0%} | {r['predicted']:.3f} | "
                     f"{r['measured']:.3f}{'' if r['reliable'] else ' †'} | {r['base_ms']:.3f} | "
                     f"{r['table_seconds']:.0f} |")
    lines += ["", "† the rounds disagreed by more than 1.3x: a busy machine, or a runtime whose timings vary."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg,resnet20")
    parser.add_argument("--runtimes", default="eager,onnxruntime")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--out", default=os.path.join(RESULTS, "latency_model.json"))
    args = parser.parse_args(argv)
    try:
        names = [m for m in args.models.split(",") if m]
        runtimes = [r for r in args.runtimes.split(",") if r]
        batches = [int(b) for b in args.batches.split(",") if b]
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError as error:
        parser.error(str(error))
    unknown = [m for m in names if m not in models.MODELS]
    if unknown or any(not 0 < b <= 1 for b in budgets) or any(b < 1 for b in batches):
        parser.error(f"--models from {sorted(models.MODELS)}, --budgets in (0, 1], --batches >= 1")
    records = []
    for name in names:
        for runtime in runtimes:
            for batch in batches:
                records += measure(name, runtime, batch, budgets)
    meta = {"machine": machine(), "commit": git_commit(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(args.out, json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", render(records, meta))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
