"""Wall time of the discriminant analysis on one process against several (torch.distributed, gloo, CPU).

    python benchmarks/run_distributed.py                          # VGG-BN on the 54,000 Fashion-MNIST training images
    python benchmarks/run_distributed.py --model lenet5 --processes 1,2 --out /tmp/d.json

The same analysis (`DiscriminantAnalyzer.run` on the pre-decision layer and every conv block of a VGG-BN,
whole training set) runs once in one process using every core, then in N processes that split the cores and
the data and combine their statistics exactly (`gpp_ext.distributed.all_reduce_scatter`). Each row is the
median of `--repeats` timed runs after a warm-up, measured on rank 0 from a barrier before the run to the end
of the all-reduce; the combined statistics are checked against the one-process ones (to 1e-5: the float32 features
themselves round differently in other batch shapes).
Writes benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks._meta import cpu_model, git_commit  # noqa: E402
from gpp_ext import data, models  # noqa: E402
from gpp_ext.analysis import DiscriminantAnalyzer  # noqa: E402
from gpp_ext.distributed import barrier  # noqa: E402
from gpp_ext.io import write_text_atomic  # noqa: E402
from gpp_ext.testing import rel_err, run_processes  # noqa: E402


def _setup(model_name: str, data_name: str):
    splits = data.load_dataset(data_name)
    torch.manual_seed(0)
    kwargs = {"input_size": splits.input_shape[-1]} if model_name == "lenet5" else {}
    model = models.build(model_name, in_channels=splits.input_shape[0], num_classes=splits.num_classes, **kwargs)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)] + ["classifier:input"]
    loader = DataLoader(splits.train, batch_size=256)
    return model.eval(), splits, layers, loader


def _time(model, splits, layers, loader, repeats: int):
    times, state = [], None
    for i in range(repeats + 1):  # the first is a warm-up
        barrier()
        start = time.perf_counter()
        with DiscriminantAnalyzer(model, splits.num_classes, layers=layers) as analyzer:
            analyzer.run(loader, progress=False)
        if i:
            times.append(time.perf_counter() - start)
        state = analyzer.state_dict()
    return times, state


def _worker(rank, world, model_name, data_name, repeats, threads, out):
    torch.set_num_threads(threads)
    model, splits, layers, loader = _setup(model_name, data_name)
    times, state = _time(model, splits, layers, loader, repeats)
    if rank == 0:
        torch.save({"times": times, "state": state}, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg", choices=("vgg", "lenet5"))
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--processes", default="2", help="comma-separated process counts beside one process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "distributed.json"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    counts = [int(p) for p in args.processes.split(",")]

    torch.set_num_threads(cores)
    model, splits, layers, loader = _setup(args.model, args.data)
    times, want = _time(model, splits, layers, loader, args.repeats)
    rows = [{"processes": 1, "threads_each": cores, "seconds": times, "median_s": statistics.median(times)}]
    print(f"1 process x {cores} threads: {statistics.median(times):.2f} s", flush=True)
    for world in counts:
        threads = max(1, cores // world)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rank0.pt")
            run_processes(_worker, world, args.model, args.data, args.repeats, threads, path, timeout=3600)
            got = torch.load(path, weights_only=True)
        assert got["state"]["num_samples"] == want["num_samples"]
        error = max(rel_err(got["state"]["layers"][n][k], want["layers"][n][k])
                    for n in want["layers"] for k in ("count", "mean", "within"))
        # float32 forward passes of other batch shapes round differently (~1e-7 a feature); a missing or
        # doubled term of the combination would be O(1)
        assert error < 1e-5, f"distributed statistics differ from one process's by {error:.2e}"
        median = statistics.median(got["times"])
        rows.append({"processes": world, "threads_each": threads, "seconds": got["times"], "median_s": median,
                     "max_rel_err_vs_one_process": error})
        print(f"{world} processes x {threads} threads: {median:.2f} s (statistics within {error:.1e} of one "
              f"process)", flush=True)
    commit = git_commit()
    meta = {"model": args.model, "dataset": args.data, "samples": len(splits.train), "layers": layers,
            "machine": f"{cpu_model()}, {cores} cores", "torch": torch.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base = rows[0]["median_s"]
    table = [f"# Distributed analysis ({args.model}, {args.data}, {meta['samples']:,} samples, "
             f"{len(layers)} layers)", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, commit {commit}; gloo on one machine; "
             f"median of {args.repeats} runs.", "",
             "| processes × threads | wall time (s) | vs one process |", "|---|---:|---:|"]
    table += [f"| {r['processes']} × {r['threads_each']} | {r['median_s']:.2f} | {base / r['median_s']:.2f}× |"
              for r in rows]
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
