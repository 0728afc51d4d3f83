"""`python -m benchmarks.growth`: the command line (the package's doc says what it measures)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import gpp_ext
from gpp_ext import recipes
from gpp_ext.loop import train_kwargs

from .._meta import Exclusive
from . import __doc__ as PROTOCOL
from .render import render
from .runner import MODES, PARTS, RESULTS, Runs, run_seed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=PROTOCOL.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="digits, one seed, tiny epochs")
    parser.add_argument("--resume", action="store_true", help="keep the runs recorded with the same settings")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "growth.json"))
    parser.add_argument("--render", action="store_true", help="only render the tables and plot from --out")
    args = parser.parse_args(argv)
    stem = os.path.splitext(args.out)[0]
    if args.render:
        if not os.path.exists(args.out):
            parser.error(f"--render: no results at {args.out}")
        with open(args.out) as f:
            records = json.load(f)
        render(records, stem)
        print(f"benchmarks.growth: {len(records)} runs -> {stem}.md, {stem}.png")
        return 0
    mode = dict(MODES["smoke" if args.smoke else "full"])
    if args.seeds:
        try:
            mode["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    settings = {k: v for k, v in mode.items() if k != "seeds"}
    settings["train"] = {k: v for k, v in train_kwargs(recipes.build("gpp")).items() if k != "amp"}
    settings["gpp_ext"] = gpp_ext.__version__
    with Exclusive(args.out, "benchmarks.growth"):   # one writer per results file
        return _run(args, mode, settings, stem)


def _run(args, mode: dict, settings: dict, stem: str) -> int:
    runs = Runs(args.out, settings, args.resume, after=lambda records: render(records, stem))

    def log(text):
        print(text, flush=True)

    if args.resume:   # a long run's log says at once where it goes on from
        log(f"benchmarks.growth: resuming with {len(runs.records)} run(s) recorded in {args.out}")
    # `kill` (SIGTERM) stops a background run as cleanly as Ctrl-C does: a shell starts background jobs with
    # SIGINT ignored, so Ctrl-C's signal cannot reach them
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for part in PARTS:   # the claims' runs for every seed first, then the control, then the rest
            for seed in mode["seeds"]:
                run_seed(seed, mode, runs, log, part)
    except KeyboardInterrupt:
        print("benchmarks.growth: interrupted; run again with --resume to go on", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    render(runs.records, stem)
    print(f"benchmarks.growth: {len(runs.records)} runs -> {args.out}, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
