"""Compression benchmark: GPP against our baselines and the strongest peers, at equal training.

    python -m benchmarks.compression --quick           # LeNet-5, 1 seed, 2 budgets: a few minutes on 2 cores
    python -m benchmarks.compression                   # LeNet-5, VGG-BN, ResNet-20, 3 seeds: days; run it in parts
    python -m benchmarks.compression --resume          # go on with an interrupted run (same settings)
    python -m benchmarks.compression --models vgg --seeds 0 --budgets 0.1 --methods gpp,l1
    python -m benchmarks.compression --latency         # time the kept compact models (on a quiet machine)

The protocol (harness version 5) is in `protocol.py`, the choices made on validation in `choices.py`, the order
of the work in `runner.py`, the methods in `methods.py`. In short: the same converged base per (model, seed);
the same epochs after it for every method, all trained with the loop's own recipe; GPP's rows are
`GrowPushPrune(...).run()` with the default recipe, which must win GPP's candidates on validation at several
budgets; the peers' regularisation chosen on validation; 3 seeds; wall time per run recorded.

The latency pass (`--latency`, after the runs): per model and budget, the base and every kept compact model
timed interleaved in one window, eager PyTorch and ONNX Runtime, at batch 1 and 64; the tables report its
speed-ups over the base, since latencies measured inside each run depend on what else the machine did.

Results are written after every run (atomically) to benchmarks/results/compression.json and the choices to
compression-choices.json; the tables (.md) and the accuracy-vs-cost plot (.png) are rendered from all records
at the end. Base models and budget-independent preparations are cached under runs/compression/, so `--resume`
retrains nothing; the full mode's base models are also kept in benchmarks/results/bases/ (committed, ~1.3 MB
for a VGG-BN), so a fresh checkout resumes without retraining them. Ctrl-C or SIGTERM saves and renders what
is done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import gpp_ext
import torch
from gpp_ext import data, recipes
from gpp_ext.io import write_text_atomic

from .._meta import Exclusive, git_commit, machine
from . import choices as choosing
from . import latency, methods, protocol, render, runner
from .protocol import HARNESS_VERSION, MODES, settings  # noqa: F401  (the harness's public names)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")


def gpp_rows() -> tuple:
    """GPP's rows: the default recipe and its variant with the push switched (the fade where the default has
    no push, no push where it has one)."""
    return ("gpp", "gpp-fade" if recipes.build("gpp").push == "none" else "gpp-nopush")


def default_methods(model_methods, tp: bool) -> list:
    out = []
    for m in model_methods:
        if m == "gpp":
            out += gpp_rows()
        elif tp or not m.startswith("torch_pruning:"):
            out.append(m)
    return out


def _list(kind, choices=None):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {list(choices)}, got {text!r}"
                                             if choices is not None else f"expected a non-empty list, got {text!r}")
        return values
    return parse


def _load(path, args, what) -> list:
    """The records of an earlier run with the same settings (for --resume); refuses to mix settings."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"benchmarks.compression: --resume cannot read {path}: {e}")
    mismatched = [r for r in records if r.get("model") not in args.base_epochs
                  or any(r.get(k) != v for k, v in settings(args, r["model"]).items())]
    if mismatched:
        keys = ("model", *settings(args, args.models[0]))
        raise SystemExit(f"benchmarks.compression: {path} holds {len(mismatched)} {what} made with other settings "
                         f"(e.g. {json.dumps({k: mismatched[0].get(k) for k in keys})}); "
                         "resume with the same mode and --data, or write elsewhere with --out")
    return records


def _latency(args, stem: str, choices_path: str) -> int:
    """The `--latency` pass over the records in `args.out` (see `latency.py`)."""
    records, choices = _load(args.out, args, "record(s)"), _load(choices_path, args, "choice(s)")
    records_of = [r for r in records if r["model"] in args.models]
    if not records_of:
        print(f"benchmarks.compression: no records of {args.models} in {args.out} to time", file=sys.stderr)
        return 1
    kept = args.kept
    shapes = {}

    def input_shape_of(name):
        if name not in shapes:
            shapes[name] = data.load_dataset(args.data, seed=0).input_shape
        return shapes[name]

    def load_base(name):
        stem0 = protocol.base_stem(name, args, 0)
        for folder in (args.cache, kept):
            if folder and os.path.exists(os.path.join(folder, stem0 + ".pt")):
                return gpp_ext.io.load(os.path.join(folder, stem0 + ".pt"))
        raise SystemExit(f"benchmarks.compression --latency: no base model {stem0}.pt in {args.cache} or {kept}")

    def path_of(r):
        return protocol.compact_path(args.cache, f"{r['model']}-{args.data}-{args.mode}-seed{r['seed']}",
                            r.get("budget_kind", "params"), r["budget"], r["method"])

    def save(rs):
        write_text_atomic(args.out, json.dumps(rs, indent=1) + "\n")

    bases = {}

    def rebuild(r):  # a compact model not kept in the cache (a fresh checkout): its shapes from its widths
        if r["model"] not in bases:
            bases[r["model"]] = load_base(r["model"])
        return latency.from_widths(bases[r["model"]], r, torch.zeros(2, *input_shape_of(r["model"])))

    timed = latency.latency_pass(records_of, latency.compact_loader(path_of, rebuild), load_base, input_shape_of,
                                 machine=args.machine, commit=args.commit, save=lambda _: save(records))
    print(f"benchmarks.compression: timed {timed} of {len(records_of)} record(s)' compact models", flush=True)
    _render(records, choices, stem)
    return 0 if timed else 1


def _render(records, choices, stem) -> str:
    table = render.render(records, {"date": time.strftime("%Y-%m-%d %H:%M:%S")}, choices)
    write_text_atomic(stem + ".md", table)
    render.plot(records, stem + ".png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet-5, 1 seed, budgets 25%% and 10%%")
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--models", type=_list(str, ("lenet5", "vgg", "resnet20")),
                        help="comma-separated (default: the mode's)")
    parser.add_argument("--seeds", type=_list(int), help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--budgets", type=_list(float), help="comma-separated parameter fractions in (0, 1)")
    parser.add_argument("--flops-budgets", type=_list(float), help="comma-separated FLOP fractions in (0, 1)")
    parser.add_argument("--methods", help="comma-separated method names, run on every model (default: each "
                                          "model's own list, protocol.MODES)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --out and run only the missing ones, reusing cached models")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compression.json"))
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "runs", "compression"),
                        help="folder for the trained base and prepared models (default: runs/compression)")
    parser.add_argument("--render", action="store_true",
                        help="only render the tables and the plot from --out's records (e.g. while a run goes on)")
    parser.add_argument("--latency", action="store_true",
                        help="only time the kept compact models of --out's records, every budget's models and the "
                             "base interleaved in one window (run it on a quiet machine), then render")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's tiny run
    args = parser.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401  (only whether it is installed)
        tp = True
    except ImportError:
        print("benchmarks.compression: torch-pruning is not installed (pip install torch-pruning); its rows are "
              "left out", file=sys.stderr)
        tp = False
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[args.mode]
    args.models = args.models or mode["models"]
    unknown = [m for m in args.models if m not in mode["base_epochs"]]
    if unknown:
        parser.error(f"--models: the {args.mode} mode runs {', '.join(mode['base_epochs'])}, not {unknown}")
    args.seeds = args.seeds or mode["seeds"]
    args.choice_seed = mode["seeds"][0]   # every validation choice is made at this seed
    for key in ("base_epochs", "epochs", "prep_epochs", "sweep_values", "choice_budgets", "ablation_budgets"):
        setattr(args, key, mode[key])
    args.candidates = mode["candidates"] or tuple(choosing.CANDIDATES)
    args.ablation = mode["ablation"] if mode["ablation"] is not None else choosing.ABLATION
    args.kd = mode.get("kd") if args.methods is None and not (args.budgets or args.flops_budgets) else None
    args.recipe_models = protocol.RECIPE_MODELS if args.mode == "full" else tuple(mode["models"])
    args.kept = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bases") if args.mode == "full" else None
    for given in (args.budgets, args.flops_budgets):
        if given and any(not 0 < b < 1 for b in given):
            parser.error(f"--budgets/--flops-budgets: every budget must be a fraction in (0, 1), got {given}")
    if args.budgets or args.flops_budgets:
        chosen = [("params", b) for b in args.budgets or ()] + [("flops", b) for b in args.flops_budgets or ()]
        args.budgets = {m: chosen for m in args.models}
    else:
        args.budgets = {m: mode["budgets"][m] for m in args.models}
    args.available = methods.known(tp)
    args.gpp_methods = methods.GPP
    if args.methods is None:
        args.methods_of = {m: default_methods(mode["methods"][m], tp) for m in args.models}
    else:
        given = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in given if m not in args.available]
        if unknown or not given:
            parser.error(f"--methods: unknown {unknown or given}; known here: {', '.join(args.available)}"
                         + ("" if tp else " (torch-pruning is not installed)"))
        args.methods_of = {m: given for m in args.models}
    args.commit, args.machine = git_commit(), machine()
    stem = os.path.splitext(args.out)[0]
    choices_path = stem + "-choices.json"
    if args.render:
        records, choices = _load(args.out, args, "record(s)"), _load(choices_path, args, "choice(s)")
        if not records:
            print(f"benchmarks.compression: no records in {args.out} to render", file=sys.stderr)
            return 1
        _render(records, choices, stem)
        return 0
    # one writer per results file: a second run beside this one would overwrite its records
    with Exclusive(args.out, "benchmarks.compression"):
        return _latency(args, stem, choices_path) if args.latency else _run(args, stem, choices_path)


def _run(args, stem: str, choices_path: str) -> int:
    """The runs: the choices, then every cell not yet recorded (`runner.run`), saved after each."""
    records = _load(args.out, args, "record(s)") if args.resume else []
    choices = _load(choices_path, args, "choice(s)") if args.resume else []
    if records or choices:
        print(f"benchmarks.compression: resuming with {len(records)} record(s) and {len(choices)} choice(s)",
              flush=True)

    def save(rs):  # after every run, so an interruption loses at most the run in progress
        write_text_atomic(args.out, json.dumps(rs, indent=1) + "\n")

    def save_choices(cs):
        write_text_atomic(choices_path, json.dumps(cs, indent=1) + "\n")

    started = time.perf_counter()
    interrupted = False
    # `kill` (SIGTERM) stops a background run as cleanly as Ctrl-C does: a shell starts background jobs with
    # SIGINT ignored, so Ctrl-C's signal cannot reach them.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        runner.run(args, records, save, choices, save_choices)
    except KeyboardInterrupt:  # what was measured so far is saved and rendered; --resume goes on from there
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not records:
        print("benchmarks.compression: nothing was run", file=sys.stderr)
        return 130 if interrupted else 1
    save(records)
    print(_render(records, choices, stem))
    print(f"benchmarks.compression: {len(records)} records ({round(time.perf_counter() - started)} s this run) "
          f"-> {args.out}, {stem}.md, {stem}.png")
    if interrupted:
        print("benchmarks.compression: interrupted; run again with --resume to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
