"""Runs the kernel benchmarks once and saves the figures with the context needed to read them.

    python benchmarks/run_kernels.py                 # full sizes, all cores
    python benchmarks/run_kernels.py --quick         # small shapes, a smoke run of the harness
    python benchmarks/run_kernels.py -k class_scatter --threads 1

Writes benchmarks/results/kernels.json (machine, threads, torch, build, git commit, every row's median and
interquartile range) and kernels.md, and prints the table: per op and shape, each row's median time, the
reference's time over the row's (speed-up, > 1 is faster than the pure-PyTorch reference), for
class_scatter the row's time over one float32 X^T X of the same shape (the GEMM floor; target <= 1.2), and
for GPU rows the CPU extension's time over the row's (target >= 10). GPU rows appear when a GPU is present.
Methodology: medians of 5 rounds after one warm-up (pytest-benchmark pedantic mode), threads pinned with
torch.set_num_threads, seeded inputs, every row checked against the reference before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._meta import cpu_model, git_commit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rows_from(bench_json: dict) -> list[dict]:
    rows = []
    for b in bench_json["benchmarks"]:
        s = b["stats"]
        rows.append({"group": b["group"], "op": b["group"].split("[")[0], "device": b["params"].get("device", "cpu"),
                     "impl": b["params"]["impl"], "median_s": s["median"], "iqr_s": s["iqr"], "min_s": s["min"],
                     "rounds": s["rounds"], **({"seconds": b["extra_info"]["seconds"]}
                                               if "seconds" in b.get("extra_info", {}) else {})})
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per group: reference/row (speed-up), row/gemm_floor, and for GPU groups the CPU extension's time over
    the row's (the GPU's speed-up over the CPU path on the same op and shape)."""
    times = {}
    for r in rows:
        times.setdefault(r["group"], {})[r["impl"]] = r["median_s"]
    out = {}
    for group, t in times.items():
        entry = {}
        if "reference" in t:
            entry["speedup_vs_reference"] = {k: t["reference"] / v for k, v in t.items()}
        if "scipy" in t:
            entry["speedup_vs_scipy"] = {k: t["scipy"] / v for k, v in t.items()}
        if "gemm_floor" in t:
            entry["vs_gemm_floor"] = {k: v / t["gemm_floor"] for k, v in t.items()}
        cpu = times.get(group.replace("[cuda]", "[cpu]"), {}).get("extension")
        if "[cuda]" in group and cpu is not None:
            entry["speedup_vs_cpu_extension"] = {k: cpu / v for k, v in t.items()}
        out[group] = entry
    return out


def table(rows: list[dict], rat: dict) -> str:
    lines = ["| op[device] and shape | impl | median | IQR | reference / impl | scipy / impl | impl / GEMM floor | "
             "CPU ext / impl |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, suffix=""):
        return "" if value is None else f"{value:.2f}{suffix}"

    for r in rows:
        g = rat.get(r["group"], {})
        speed = g.get("speedup_vs_reference", {}).get(r["impl"])
        floor = g.get("vs_gemm_floor", {}).get(r["impl"])
        gpu = g.get("speedup_vs_cpu_extension", {}).get(r["impl"])
        scipy = g.get("speedup_vs_scipy", {}).get(r["impl"])
        lines.append(f"| {r['group']} | {r['impl']} | {r['median_s'] * 1e3:.3f} ms | {r['iqr_s'] * 1e3:.3f} ms | "
                     f"{fmt(speed, 'x')} | {fmt(scipy, 'x')} | {fmt(floor)} | {fmt(gpu, 'x')} |")
    phases = [r for r in rows if r.get("seconds")]
    if phases:
        names = list(dict.fromkeys(k for r in phases for k in r["seconds"]))
        lines += ["", "Where a `prune` call's time goes (seconds, its last round):", "",
                  "| model | criterion | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for r in phases:
            cells = " | ".join(f"{r['seconds'][k]:.3f}" if k in r["seconds"] else "" for k in names)
            lines.append(f"| {r['group']} | {r['impl']} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run of the harness)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "kernels.json"), help="output JSON path")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")

    env = dict(os.environ, GPP_EXT_BENCH="smoke" if args.quick else "full", GPP_EXT_BENCH_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "bench_ops.py"),
               os.path.join(HERE, "bench_pruning.py"), os.path.join(HERE, "bench_training.py"),
               "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds",
               "--benchmark-sort=name"]
        if args.k:
            cmd += ["-k", args.k]
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        if code != 0:
            print(f"run_kernels: the benchmark run failed (pytest exit {code})", file=sys.stderr)
            return code
        with open(raw) as f:
            bench = json.load(f)

    import torch

    import gpp_ext
    from gpp_ext.io import write_text_atomic

    rows = rows_from(bench)
    rat = ratios(rows)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "threads": args.threads,
        "torch": torch.__version__,
        "build_info": gpp_ext.build_info(),
        "commit": git_commit(),
        "rows": rows,
        "ratios": rat,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    gpu = f", GPU {result['machine']['gpu']}" if result["machine"]["gpu"] else ", no GPU"
    rounds = ("medians of 5 rounds after a warm-up" if not args.quick
              else "quick mode: one round, no warm-up (a smoke run, not a measurement)")
    md = (f"# Kernel benchmarks\n\n{result['date']}, commit {result['commit']}, {result['machine']['cpu']}"
          f"{gpu}, {args.threads} threads, torch {result['torch']}, mode {result['mode']}.\n"
          f"Produced by `python benchmarks/run_kernels.py`; {rounds}.\n\n"
          f"{table(rows, rat)}\n")
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
