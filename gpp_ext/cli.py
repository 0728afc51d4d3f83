"""The `gpp` command: compress a model for a data set, run the demo, show a report, list criteria, export.

    gpp compress --model lenet5 --data fashion-mnist --target-params 0.1 --out runs/lenet5   # the gpp recipe
    gpp compress --model vgg --data fashion-mnist --recipe fade --epoch-budget 3 --lr-schedule onecycle
    gpp compress --model mynet.py:make_net --data imagefolder:photos --image-size 32 --device auto
    gpp compress --model torchvision:resnet18 --weights resnet18.pth --data npz:arrays.npz
    gpp demo                      # Fashion-MNIST when installed, else digits; writes runs/demo/
    gpp report runs/demo          # the summary table of a finished run
    gpp criteria                  # the registered pruning criteria, with what each measures
    gpp export runs/demo/model.pt --onnx demo.onnx --dynamic-batch    # checked in ONNX Runtime
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from dataclasses import fields as dataclass_fields, replace as dataclass_replace

from . import growth, io, pushes, recipes
from .export import OPSETS
from .fade import FADE_SCHEDULES
from .latency import RUNTIMES
from .loop import FINAL_FINETUNE, GROW_ORDERS, SCHEDULES, LoopConfig
from .pruning import criteria
from .pruning.allocation import ALLOCATIONS
from .io import write_text_atomic
from .run_folder import RUN_FILES, RunFolder
from .training import LR_SCHEDULES, OPTIMIZERS

__all__ = ["main"]

MODELS = ("lenet5", "vgg", "inception", "resnet20")
DATA = ("fashion-mnist", "digits")
MODEL_HELP = ("a built-in model (" + ", ".join(MODELS) + "), torchvision:NAME, timm:NAME, path/to/file.py:factory, "
              "package.module:factory (a callable returning an nn.Module), or a model file saved by gpp (model.pt) "
              "to compress further")
DATA_HELP = ("fashion-mnist, digits, imagefolder:DIR (one sub-folder per class, or DIR/train, DIR/test and optionally "
             "DIR/val holding them), or npz:FILE (arrays x [N,C,H,W] and y [N]; optional x_test, y_test)")
DEMO_OUT = os.path.join("runs", "demo")
DEMO_MARKER = ".gpp-demo"   # in a folder a demo wrote: the next demo may replace the run there
MISSED_TARGET = 3  # exit status of a run whose compact model missed the size target or the accuracy floor


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` (int or float) in the given range; anything else is refused by argparse
    (exit 2) with a message naming the option, before any data is read or model built."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        bad = not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and (value >= high if high_open else value > high))
        if bad:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
            hi = "" if high is None else f"{high}" + (")" if high_open else "]")
            where = f" in {lo}, {hi}" if lo and hi else (f" >{'' if low_open else '='} {low}" if lo else
                                                        f" <{'' if high_open else '='} {high}" if hi else "")
            raise argparse.ArgumentTypeError(f"must be a finite {'integer' if kind is int else 'number'}{where}, "
                                             f"got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_fraction = _number(float, 0, 1, low_open=True)
_count = _number(int, 0)           # epochs, seeds: >= 0
_positive = _number(int, 1)        # sizes, iterations: >= 1
_epochs = _number(float, 0)        # fractions of an epoch allowed


# Help for the loop settings people change most; every other LoopConfig field gets a flag too (`_config_flags`).
CONFIG_HELP = {
    "target_params": "stop at this fraction of the base model's parameters (with --grow: of the grown model's)",
    "target_flops": "reach this fraction of the base model's FLOPs; given alone, the only target (the budget "
                    "counts FLOPs); with --target-params, both",
    "target_latency": "reach this fraction of the base model's latency, as per-layer tables measured on this "
                      "machine in --latency-runtime at --latency-batch predict it (sets --budget-kind latency; "
                      "the tables are cached under $GPP_EXT_CACHE, default ~/.cache/gpp_ext)",
    "latency_runtime": "the runtime a latency budget is measured in: eager (PyTorch) or onnxruntime (CPU)",
    "latency_batch": "the batch size a latency budget is for (1: one request at a time)",
    "budget_kind": "what --schedule budget counts: params (--target-params), flops (--target-flops) or latency "
                   "(--target-latency)",
    "accuracy_floor": "largest drop of validation accuracy (a fraction) the compact model may show; a run it "
                      "stops before the size target, or whose every compact model falls below it, exits with "
                      "status 3",
    "epochs": "initial training epochs (with --weights or a model file: 0, or 1 when the head is re-initialised "
              "for new classes)",
    "push_epochs": "push epochs per iteration",
    "finetune_epochs": "fine-tuning epochs per iteration",
    "epoch_budget": "all training after the base, in epochs, split evenly over --max-iterations (replaces "
                    "--push-epochs and --finetune-epochs)",
    "push_share": "with --epoch-budget: the push's share of each iteration",
    "max_iterations": "push-prune-fine-tune iterations at most",
    "batch_size": "training batch size (every phase)",
    "weight_decay": "weight decay of every training phase",
    "warmup": "warm-up share of each training phase (--lr-schedule warmup-cosine or onecycle)",
    "eta_start": "--schedule eta: the first iteration prunes channels whose utility is below eta * its std",
    "eta_step": "--schedule eta: how much eta rises each iteration",
    "fade_schedule": "--push fade: how the removal set's weights fade to zero (linear or cosine)",
    "fade_fixed_widths": "--push fade: keep the first selection's per-layer widths; later selections only change "
                         "which channels go",
    "fade_gradual": "--push fade: the removal set grows over the selections towards those widths (needs "
                    "--fade-fixed-widths)",
    "temperature": "softmax temperature of every distillation (--grow-distill, --finetune-distill)",
    "alpha": "--push loss/fade: weight of the separation term (discriminant push; 0 turns it off)",
    "beta": "--push loss/fade: weight of the decorrelation term (0 turns it off)",
    "gamma": "--push loss/fade: weight of the concentration term (0 turns it off)",
    "separation": "--push loss/fade: the separation term, per-neuron fisher ratio or the lda eigenvalues",
    "neurons": "pre-decision neurons the lda/fisher criteria trace: a count, or a fraction of the classifier's "
               "inputs",
    "lr": "peak learning rate of every phase",
    "lr_schedule": "every phase's learning rate: constant, cosine (to 0), warmup-cosine or onecycle (warm-up, then "
                   "cosine annealing); each phase is one whole cycle",
    "optimizer": "adamw, or sgd (momentum 0.9, Nesterov)",
    "push_optimizer": "--push hgs: the optimiser of its sparse training (unset: --optimizer's)",
    "push_lr": "--push hgs: that training's peak learning rate (unset: --lr)",
    "criterion": "channel utility (registered criteria; `gpp criteria` describes them)",
    "schedule": "eta: each iteration prunes below a threshold raised every iteration; budget: iteration i of "
                "--max-iterations keeps target**(i/n) of the base cost",
    "cuts": "cuts per prune stage, each analysed afresh (--schedule budget)",
    "allocation": "--schedule budget: how many channels each layer keeps: one threshold on utilities across "
                  "layers (global), the same fraction of every layer (uniform), the cost-aware widths of greatest "
                  "value on a width grid (solver), the solver with each layer weighted by how much the loss depends "
                  "on it (its mask Fisher information: fisher), the solver calibrated by the loss of candidate cuts "
                  "(search), or a genetic search on that loss guided by per-layer sensitivity (genetic)",
    "normalize": "compare utilities across layers divided by their layer's mean, or as they are",
    "floor": "--schedule budget: every layer keeps at least this share of its channels",
    "round_to": "keep every pruned width a multiple of this (the solver's grid steps by layer size when 1): odd "
                "widths can make a smaller model slower in ONNX Runtime and oneDNN, whose kernels work on blocks of "
                "8 or 16 channels",
    "push": "how each iteration trains before its cut: " + "; ".join(f"{k}: {v}" for k, v in pushes.describe().items()),
    "fade_reselect": "--push fade: selections of the removal set during each push (the widths stay those of the "
                     "first)",
    "fade_end": "--push fade: the share of each push at which the removal set reaches zero; below 1 the rest of the "
                "push trains the kept channels alone",
    "distill": "weight of distillation from the model as it was before each push (0: off)",
    "sparsity": "--push hgs, sss, sss_blocks: the weight of the hierarchical group-sparse penalty, or of the L1 "
                "penalty on the structures' scales",
    "finetune_distill": "weight of distillation from the base model in every fine-tuning (0: off; --temperature)",
    "seed": "seeds the initial weights, the batch order and every randomised step",
    "grow_threshold": "--grow: the gain in validation accuracy a module or planting round must bring to be kept",
    "grow_epochs": "--grow: epochs of training for each grown candidate",
    "max_modules_per_stage": "--grow inception: no stage grows beyond this many modules",
    "grow_order": "--grow inception: grow the stages first to last, or the most critical first (triage: each "
                  "module collapsed into one layer, the accuracy lost measured)",
    "plant_rounds": "--grow planting: planting rounds at most",
    "plant_share": "--grow planting: the share of each layer's width planted per round",
    "plant_max_params": "--grow planting: the grown model keeps at most this multiple of the model's parameters",
    "grow_distill": "--grow: weight of distillation from --teacher while growing (0: off)",
    "gap_partitions": "--push gap: runs of consecutive layers that take turns being dense",
    "gap_cycles": "--push gap: how many times each run is dense",
    "final_finetune": "the last fine-tuning's data: train, or train+val (more data for the model you ship; its "
                      "validation figures, and the accuracy floor's last check, then see data it trained on)",
}
_CHOICES = {"schedule": SCHEDULES, "push": pushes.names(), "allocation": ALLOCATIONS, "normalize": ("mean", "none"),
            "criterion": tuple(criteria.names()), "budget_kind": ("params", "flops", "latency"),
            "latency_runtime": RUNTIMES, "final_finetune": FINAL_FINETUNE, "fade_schedule": FADE_SCHEDULES,
            "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS, "separation": ("fisher", "lda"),
            "grow_order": GROW_ORDERS, "push_optimizer": OPTIMIZERS}
_TYPES = {"target_params": _fraction, "target_flops": _fraction, "target_latency": _fraction, "fade_end": _fraction,
          "latency_batch": _positive,
          "accuracy_floor": _number(float, 0, 1, high_open=True), "push_share": _number(float, 0, 1),
          "warmup": _number(float, 0, 1, high_open=True), "floor": _number(float, 0, 1, high_open=True),
          "lr": _number(float, 0, low_open=True), "push_lr": _number(float, 0, low_open=True),
          "temperature": _number(float, 0, low_open=True),
          "epochs": _count, "seed": _count, "grow_epochs": _count, "push_epochs": _epochs, "finetune_epochs": _epochs,
          "epoch_budget": _epochs, "batch_size": _positive, "max_iterations": _positive, "cuts": _positive,
          "round_to": _positive, "fade_reselect": _positive, "max_modules_per_stage": _positive,
          "distill": _number(float, 0), "finetune_distill": _number(float, 0), "sparsity": _number(float, 0),
          "weight_decay": _number(float, 0), "alpha": _number(float, 0),
          "beta": _number(float, 0), "gamma": _number(float, 0), "eta_start": _number(float, 0),
          "eta_step": _number(float, 0), "neurons": lambda text: (_positive if text.strip().isdigit()
                                                                  else _fraction)(text)}
# LoopConfig fields set by other options: --ignore (module names), --amp, --grow [METHOD] (grow and growth)
_OTHER_FIELDS = ("ignore", "amp", "grow", "growth")


def _config_flags(parser) -> None:
    """One flag per LoopConfig field (`--push-epochs` for `push_epochs`), generated from the dataclass, each
    defaulting to the recipe's value: the defaults live in one place, `LoopConfig`."""
    group = parser.add_argument_group("loop settings", "default: the --recipe's value (LoopConfig's defaults for "
                                      "gpp); `python -c 'import gpp_ext.loop as l; print(l.LoopConfig())'` lists them")
    for f in dataclass_fields(LoopConfig):
        if f.name in _OTHER_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        # not given: absent from the namespace, so the recipe's value stands (and the help shows gpp's)
        help_ = CONFIG_HELP.get(f.name, f"LoopConfig.{f.name}") + f" (gpp: {f.default!r})".replace("%", "%%")
        common = dict(default=argparse.SUPPRESS, help=help_)
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif f.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[f.name], **common)
        elif f.name in _TYPES:
            group.add_argument(flag, type=_TYPES[f.name], **common)
        else:  # a number without a range of its own: finite, checked by LoopConfig.validate before anything runs
            kind = int if isinstance(f.default, int) and not isinstance(f.default, bool) else float
            group.add_argument(flag, type=_number(kind), **common)


def _config(args, model_name: str, **extra):
    """The run's LoopConfig: `--recipe` with every flag given on the command line applied."""
    overrides = {f.name: getattr(args, f.name) for f in dataclass_fields(LoopConfig)
                 if f.name not in _OTHER_FIELDS and getattr(args, f.name, None) is not None}
    if "target_latency" in overrides and "budget_kind" not in overrides:
        overrides["budget_kind"] = "latency"  # a latency target is only met by a latency budget
    if "target_flops" in overrides and not {"target_params", "budget_kind", "target_latency"} & set(overrides):
        # a FLOP target alone is the only target: the budget counts FLOPs, and no parameter target (the
        # recipe's 10%) is added behind the user's back
        overrides.update(budget_kind="flops", target_params=1.0)
    if getattr(args, "no_grow", False) and args.grow is not None:
        raise ValueError(f"--grow {args.grow} and --no-grow contradict each other; give one of them")
    if "epoch_budget" in overrides and {"push_epochs", "finetune_epochs"} & set(overrides):
        given = " and ".join(f"--{n.replace('_', '-')}" for n in ("push_epochs", "finetune_epochs") if n in overrides)
        raise ValueError(f"--epoch-budget sets the epochs of every push and fine-tuning (split by --push-share), so "
                         f"{given} would be ignored; give one or the other")
    if getattr(args, "no_grow", False):
        grow = False
    else:
        grow = args.grow if args.grow is not None else ("inception" if model_name == "inception" else False)
    try:
        return recipes.build(args.recipe, grow=bool(grow), amp=args.amp, **({"growth": grow} if grow else {}),
                             **overrides, **extra)
    except ValueError as error:  # the settings' check, in the command line's words
        raise ValueError(_in_flags(str(error))) from error


def _in_flags(message: str) -> str:
    """A `LoopConfig` error as the command line says it: each setting named by its flag (`budget_kind=` ->
    `--budget-kind=`, `fade_gradual=True` -> `--fade-gradual`)."""
    import re

    names = {f.name for f in dataclass_fields(LoopConfig) if f.name != "ignore"}

    def flag(match) -> str:
        name = match.group(1)
        if name not in names:
            return match.group(0)
        value = match.group(2) if match.lastindex and match.lastindex >= 2 else None
        if value == "=True":
            return f"--{name.replace('_', '-')}"
        if value == "=False":
            return f"--no-{name.replace('_', '-')}"
        return f"--{name.replace('_', '-')}" + (value or "")

    message = re.sub(r"^LoopConfig: ", "", message)
    message = re.sub(r"(?<![\w.'-])([a-z][a-z0-9_]*)(=True\b|=False\b|=|(?= must\b))", flag, message)
    return re.sub(r"(?<![\w.'-])([a-z]+(?:_[a-z0-9]+)+)\b(?!')", flag, message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help unless there is nothing to show: no value (None: the help says
    what happens then), an off switch, or a help that states its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or (action.nargs == 0 and action.default is False) or "default" in text \
                or "(gpp: " in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose "invalid choice" error also names the closest choice (`--recipe gpp_cut`: did you
    mean 'gpp-cut'?)."""

    def error(self, message: str):
        import difflib
        import re

        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:
            choices = re.findall(r"'([^']*)'", wrong.group(2)) or [c.strip() for c in wrong.group(2).split(",")]
            close = difflib.get_close_matches(wrong.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        usage = self.format_usage()
        if usage.count("\n") > 4:  # a command with many options: one line pointing at --help, not a page of them
            usage = f"usage: {self.prog} [options]   ({self.prog} --help lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpp", description="Grow-Push-Prune: turn a generalist classifier into a "
                     "compact, task-specific one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    compress = sub.add_parser("compress", help="train, (grow,) push and prune a model (built-in, torchvision, "
                              "timm, your own .py factory or a saved model file) on a data set",
                              formatter_class=_HelpFormatter)
    compress.add_argument("--model", default="lenet5", help=MODEL_HELP)
    compress.add_argument("--model-args", default=None, help="JSON object of keyword arguments for the model's "
                          "factory, e.g. '{\"width\": 32}' (recorded, so the saved model rebuilds)")
    compress.add_argument("--num-classes", type=_number(int, 2), default=None, help="outputs of the model's head "
                          "(default: the data's classes; a --weights head of another size is re-initialised)")
    compress.add_argument("--trust-model-code", action="store_true", help="--model FILE.pt: rebuild it by running "
                          "the factory code its record names (a .py file or module); without this, a model file "
                          "naming code is refused, since a model file is data and runs nothing on its own")
    compress.add_argument("--factory", default=None, help="--model FILE.pt: rebuild it with this factory "
                          "(path/to/file.py:factory or package.module:factory), called with the recorded arguments")
    compress.add_argument("--weights", default=None, help="a local state-dict file to start from (nothing is "
                          "downloaded); every tensor must fit except the head's")
    compress.add_argument("--ignore", default=None, help="comma-separated module names the channel graph leaves "
                          "untouched (what an error about an op it cannot handle asks for)")
    compress.add_argument("--data", default="digits", help=DATA_HELP + " (local files only)")
    compress.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    compress.add_argument("--image-size", type=_positive, default=None, help="imagefolder: resize images to this "
                          "square size (default: keep; all images must then have one size)")
    compress.add_argument("--channels", type=int, choices=(1, 3), default=None, help="imagefolder: 1 (grayscale) or "
                          "3 (RGB) (default: 3 when any image has colour, 1 when all are grayscale)")
    compress.add_argument("--image-norm", choices=("unit", "dataset", "imagenet"), default="unit",
                          help="imagefolder: pixels in [0, 1] (unit), or normalised by the training split's "
                          "per-channel mean and std (dataset) or ImageNet's (imagenet); recorded in report.json")
    compress.add_argument("--device", default="auto", help="where training, analysis and pruning run: auto (CUDA "
                          "when available), cpu, cuda or cuda:N (latency is always measured on the CPU)")
    compress.add_argument("--amp", action="store_true", help="mixed-precision training (bfloat16 autocast; CUDA "
                          "only)")
    compress.add_argument("--out", default=None, help="output folder (default runs/MODEL-DATA)")
    compress.add_argument("--recipe", choices=recipes.names(), default="gpp", help="the loop's settings: "
                          + "; ".join(f"{k}: {v}" for k, v in recipes.DESCRIPTIONS.items())
                          + ". The flags below change single settings of it")
    compress.add_argument("--grow", nargs="?", const="inception", default=None, choices=growth.names(),
                          metavar="METHOD", help="grow the trained model first: " + "; ".join(
                              f"{k}: {v}" for k, v in growth.describe().items())
                          + " (--grow alone: inception; default: inception for --model inception, else none)")
    compress.add_argument("--teacher", default=None, metavar="FILE", help="a model file (saved by gpp, e.g. a "
                          "larger run's model.pt) to distil from while growing (--grow-distill sets the weight)")
    compress.add_argument("--no-grow", action="store_true", help="do not grow (also for --model inception)")
    _config_flags(compress)
    compress.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: all cores)")
    run = compress.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the output folder's run from its checkpoint "
                     "(refused if it was started with another model, data set or settings)")
    run.add_argument("--overwrite", action="store_true", help="delete the run the output folder holds and start "
                     "again (without --resume or --overwrite a folder holding a run is refused)")
    compress.add_argument("--peers", default=None, help="JSON list of peer results (method, model, dataset, params, "
                          "test_accuracy), e.g. benchmarks/results/compression.json, to mark on progress.png")
    compress.add_argument("--onnx-latency", action=argparse.BooleanOptionalAction, default=None,
                          help="time base and compact model in ONNX Runtime at the end (default: on when onnx, "
                          "onnxscript and onnxruntime are installed, unless GPP_EXT_ONNX_LATENCY=0)")
    compress.add_argument("--quiet", action="store_true", help="no progress bars (a line per stage stays, on "
                          "stderr)")

    demo = sub.add_parser("demo", help="a short compression run with a printed summary")
    demo.add_argument("--out", default=DEMO_OUT, help="output folder (an earlier demo's folder is replaced; "
                      "any other run there needs --overwrite)")
    demo.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in the output folder")
    demo.add_argument("--data", choices=DATA, default=None, help="default: fashion-mnist when installed, else digits")
    demo.add_argument("--data-dir", default=None)
    demo.add_argument("--quiet", action="store_true")

    report = sub.add_parser("report", help="print the summary of a finished run")
    report.add_argument("dir", help="a run's output folder (holding report.json), or its report.json")

    sub.add_parser("criteria", help="list the registered pruning criteria")

    export = sub.add_parser("export", help="export a saved model to ONNX and/or TorchScript, checked by running it",
                            formatter_class=_HelpFormatter)
    export.add_argument("model", help="a model file written by gpp compress (model.pt) or gpp_ext.io.save")
    export.add_argument("--onnx", default=None, help="write ONNX here (checked in ONNX Runtime)")
    export.add_argument("--opset", type=_number(int, *OPSETS), default=18, help=f"ONNX opset, in "
                        f"[{OPSETS[0]}, {OPSETS[1]}] (the written file is checked to declare it)")
    export.add_argument("--dynamic-batch", action="store_true", help="ONNX: a symbolic batch size (else batch 1)")
    export.add_argument("--torchscript", default=None, help="write TorchScript here (checked by torch.jit.load)")
    export.add_argument("--trust-model-code", action="store_true", help="rebuild the model by running the factory "
                        "code its record names (a .py file or module); without this, such a file is refused")
    export.add_argument("--factory", default=None, help="rebuild the model with this factory (path/to/file.py:factory "
                        "or package.module:factory), called with the recorded arguments")
    export.add_argument("--input-shape", default=None, help="one input's shape, e.g. 1,28,28 (default: from the "
                        "report.json beside the model)")
    return parser


def _model_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-args: not JSON ({error}); give an object, e.g. '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-args: give a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def _is_model_file(source: str) -> bool:
    return source.endswith(".pt") or (os.path.isfile(source) and ":" not in source)


def _check_model_source(source: str, args=None) -> None:
    """The cheap part of `--model`'s checks: a known name, an existing file, a factory file that exists; the
    options for rebuilding a model file given only with one."""
    file = _is_model_file(source)
    for option in ("factory", "trust_model_code"):
        if getattr(args, option, None) and not file:
            raise ValueError(f"--{option.replace('_', '-')}: only for rebuilding a saved model file (--model "
                             f"FILE.pt); --model {source!r} names its code itself")
    if source in MODELS or os.path.isfile(source):
        return
    if ":" not in source:
        raise ValueError(f"--model {source!r}: not a built-in model and no such file; expected {MODEL_HELP}")
    path = source.rpartition(":")[0]
    if (path.endswith(".py") or "/" in path) and not os.path.isfile(path):
        raise FileNotFoundError(f"--model {source!r}: no file {path}")


def _load_model_file(args):
    """The model file `--model` names, rebuilt as `--factory` / `--trust-model-code` allow."""
    from . import io

    if _model_args(args.model_args):
        raise ValueError("--model-args: a saved model file is rebuilt from what it records; give no arguments")
    return io.load(args.model, factory=args.factory,
                   trust_code=args.trust_model_code)


def _build_model(args, splits, saved=None):
    """The model `--model` names, built for the data (and loaded from `--weights`); a note on what was done.
    `saved` is the model file `--model` names, already loaded (`_load_model_file`)."""
    from . import models
    from .classifier import find_classifier

    source, kwargs = args.model, _model_args(args.model_args)
    num_classes = args.num_classes
    if num_classes is not None and num_classes != splits.num_classes:
        raise ValueError(f"--num-classes {num_classes}: the data ({splits.name}) has {splits.num_classes} classes; "
                         f"the head must have one output per class")
    if _is_model_file(source):
        model = saved if saved is not None else _load_model_file(args)
        note = f"continuing from {source}"
    elif source in MODELS:
        kwargs = {"in_channels": splits.input_shape[0], "num_classes": splits.num_classes, **kwargs}
        if source == "lenet5":
            kwargs.setdefault("input_size", splits.input_shape[-1])
        model, note = models.build(source, **kwargs), None
    elif ":" in source:
        model = models.build_source(source, num_classes=splits.num_classes, in_channels=splits.input_shape[0],
                                    kwargs=kwargs)
        note = None
    else:
        raise ValueError(f"--model {source!r}: not a built-in model and no such file; expected {MODEL_HELP}")
    weights = args.weights
    if weights:
        head = find_classifier(model)
        kept = models.load_weights(model, weights, head=head)
        note = f"weights from {weights}" + (f"; head {head!r} re-initialised for {splits.num_classes} classes"
                                            if kept else "")
    return model, note


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available here (torch {torch.__version__}); use "
                             f"--device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def _slug(text: str) -> str:
    """A folder name for a model or data source: `models/net.py:make` -> `net-make`."""
    import re

    text = os.path.basename(text.replace(":", "-").rstrip("/")) or text
    text = re.sub(r"\.(py|pt|npz)(?=-|$)", "", text)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def _compress(args, config_overrides=None) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and device.type == "cuda" and device.index is None:  # one GPU per process under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with _process_group("nccl" if device.type == "cuda" else "gloo"):
        return _compress_run(args, device, config_overrides)


class _process_group:
    """Under torchrun (WORLD_SIZE > 1 in the environment) joins the job's process group for the run (gloo on the
    CPU, NCCL on CUDA) and leaves it afterwards; otherwise does nothing."""

    def __init__(self, backend: str = "gloo"):
        self.backend = backend

    def __enter__(self):
        import torch.distributed as dist

        self.joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.joined:
            dist.init_process_group(self.backend)
        return self

    def __exit__(self, exc_type, *exc):
        if self.joined:
            import torch.distributed as dist

            # Leave together: a process that tears down its gloo connections while rank 0 still works (writing
            # the reports) can abort the job ("terminate called without an active exception"). After an error
            # the others may never arrive, so then leave at once.
            if exc_type is None:
                dist.barrier()
            dist.destroy_process_group()


def _compress_run(args, device, config_overrides=None) -> int:
    from . import distributed as gdist

    lead = gdist.rank() == 0  # under torchrun, rank 0 speaks and writes; every process computes
    peers = _read_peers(args.peers, args.model, args.data) if args.peers else None
    amp = args.amp
    if amp and device.type != "cuda":
        raise ValueError(f"--amp: mixed precision needs a CUDA device (--device {device})")
    _check_model_source(args.model, args)  # before the data are read (an image folder takes a while)
    if args.weights and not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights: no file {args.weights}")
    if args.teacher and not os.path.isfile(args.teacher):
        raise FileNotFoundError(f"--teacher: no file {args.teacher}")
    teacher = io.load(args.teacher) if args.teacher else None  # a model file is data: nothing it names runs
    ignore = tuple(n.strip() for n in (args.ignore or "").split(",") if n.strip())
    config = _config(args, args.model, ignore=ignore, **(config_overrides or {}))  # every setting checked now
    out = args.out or os.path.join("runs", f"{_slug(args.model)}-{_slug(args.data)}")
    # the output folder before the data are read and the model built: locked, writable, and free or continued
    folder = RunFolder(out, {}, where="gpp compress")
    with folder.lock():
        _check_out(args, out, folder)
        if getattr(args, "demo_marker", None) and lead and not args.resume:
            # the folder now takes a new demo, so a later demo may replace it (a resumed one was marked when it
            # started; a resume of someone else's run must not mark their folder)
            write_text_atomic(args.demo_marker, "a gpp demo run: the next `gpp demo` replaces this folder\n")
        return _compress_in(args, device, config, out, teacher, ignore, peers, amp, lead)


def _stage_line(line: str) -> None:
    """A stage's line on stderr, above any progress bar (so a run whose output goes to a file shows how far it
    got; --quiet turns off the bars, not these lines)."""
    from tqdm.auto import tqdm

    tqdm.write(f"gpp: {line}", file=sys.stderr)
    sys.stderr.flush()


def _check_out(args, out: str, folder) -> None:
    """The output folder `out` takes this run: no input file is one the run writes there (--overwrite would
    delete it, the run would replace it), it is writable, and a run it holds is continued or replaced."""
    for option, path in (("--model", args.model), ("--weights", args.weights), ("--teacher", args.teacher)):
        if path and os.path.isfile(path) and any(_same_file(path, os.path.join(out, n)) for n in RUN_FILES):
            raise ValueError(f"{option} {path} is a file this run writes in its output folder {out}; copy it "
                             f"elsewhere first, or choose another folder (--out)")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the folder's run and --overwrite replaces it; give one of them")
    folder.check_writable()
    if not args.resume and not args.overwrite:
        folder.refuse_existing()


def _compress_in(args, device, config, out, teacher, ignore, peers, amp, lead) -> int:
    import torch

    from . import data
    from . import distributed as gdist
    from .loop import GrowPushPrune
    from .report import summary_table, write_reports

    saved = _load_model_file(args) if _is_model_file(args.model) else None  # refused here, before the data
    splits = data.load_dataset(args.data, data_dir=args.data_dir, seed=config.seed,
                               image_size=args.image_size, channels=args.channels,
                               normalize=args.image_norm, progress=not args.quiet)
    torch.manual_seed(config.seed)  # the initial weights follow --seed, whatever ran before in this process
    model, note = _build_model(args, splits, saved)
    if (args.weights or saved is not None) and "epochs" not in vars(args):
        # A trained model (--weights, or a model file to keep compressing) is not trained again: the recipe's
        # fine-tuning was chosen on validation from converged models. A head re-initialised for new classes
        # gets one epoch, so the base's accuracy (and the floor measured from it) means something.
        epochs = 1 if note and "re-initialised" in note else 0
        config = dataclass_replace(config, epochs=epochs)
        note = f"{note}; {epochs} epoch{'s' if epochs != 1 else ''} of base training (--epochs to change)"
    unknown = [n for n in ignore if n not in dict(model.named_modules())]
    if unknown:
        raise ValueError(f"--ignore: the model has no modules {unknown[:4]}")
    loop = GrowPushPrune(model, splits, config, out_dir=out, progress=not args.quiet, device=device,
                         onnx_latency=args.onnx_latency, teacher=teacher, log=_stage_line)
    if lead:
        processes = f", {gdist.world_size()} processes" if gdist.is_distributed() else ""
        print(f"gpp: {args.model} on {args.data} ({len(splits.train)} train / {len(splits.val)} val / "
              f"{len(splits.test)} test{processes}) on {device}{' with bfloat16 autocast' if amp else ''}, recipe "
              f"{args.recipe}, target {_target(config)} -> {out}"
              + (f" ({note})" if note else ""), flush=True)
    with loop.folder.lock():  # one run per folder, from the checks to the last report
        report = loop.run(resume=args.resume, overwrite=args.overwrite)
        if not lead:
            return 0
        if peers is not None:
            report["peers"] = peers
        write_reports(report, out, loop.final_model)
    print(summary_table(report))
    print(f"gpp: {report['stopped']}; {report['seconds']:.0f} s; report in {os.path.join(out, 'report.md')}")
    floor_met = report.get("accuracy_floor_met") is not False  # None: no floor applied (a base at chance)
    if report.get("no_floor"):
        print(f"gpp: no accuracy floor applied: {report['no_floor']}", file=sys.stderr)
    if not report["target_reached"] or not floor_met:
        final, base = report["final"], report["base"]
        kept = f"{final['params'] / base['params']:.1%} of the parameters" + \
            (f" and {final['flops'] / base['flops']:.1%} of the FLOPs" if config.target_flops else "") + \
            (f" and {final['latency'] / base['latency']:.1%} of the latency" if "latency" in final else "")
        model_file = os.path.join(out, "model.pt")
        if floor_met:
            print(f"gpp: the compact model MISSED the target: it keeps {kept} (target {_target(config)}): "
                  f"{report['stopped']}. {model_file} is the smallest model "
                  + ("met" if report.get("accuracy_floor") is None else "above the accuracy floor")
                  + "; exit status 3",
                  file=sys.stderr)
        else:
            print(f"gpp: the compact model MISSED the accuracy floor: no iteration's model kept validation accuracy "
                  f"at or above {report['accuracy_floor']:.4f} (the base's {base['val_accuracy']:.4f} less "
                  f"--accuracy-floor {config.accuracy_floor:g}). {model_file} is the most accurate model met "
                  f"(validation {final['val_accuracy']:.4f}, test {final['test_accuracy']:.4f}); it keeps {kept} "
                  f"(target {_target(config)}"
                  + ("" if report["target_reached"] else ", missed") + "); exit status 3. A larger target, more "
                  "epochs (--epoch-budget) or a larger --accuracy-floor may reach both", file=sys.stderr)
        return MISSED_TARGET
    return 0


def _target(config) -> str:
    """The size target of `config`, in words."""
    if config.budget_kind == "latency":
        return f"{config.target_latency:.0%} of the latency ({config.latency_runtime}, batch {config.latency_batch})"
    if config.budget_kind == "flops":
        return f"{config.target_flops:.0%} of the FLOPs"
    return f"{config.target_params:.0%} of the parameters" + \
        (f" and {config.target_flops:.0%} of the FLOPs" if config.target_flops else "")


def _read_peers(path: str, model: str, dataset: str) -> list:
    """The peer results of `--peers` for this model and data set, read before any training."""
    try:
        with open(path) as f:
            records = json.load(f)
    except OSError as error:
        raise ValueError(f"--peers: cannot read {path} ({error.strerror or error})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"--peers: {path} is not JSON ({error})") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"--peers: {path} must hold a JSON list of result objects (method, model, dataset, params, "
                         f"test_accuracy), e.g. benchmarks/results/compression.json")
    return [r for r in records if r.get("model") == model and r.get("dataset") == dataset
            and "params" in r and "test_accuracy" in r]


def _demo(args) -> int:
    from . import data

    name = args.data
    if name is None:
        try:
            data.find_fashion_mnist(args.data_dir)
            name = "fashion-mnist"
        except FileNotFoundError:
            name = "digits"
            print("gpp demo: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using "
                  "scikit-learn's digits instead", flush=True)
    # The default recipe, sized to finish in a few minutes on 2 CPU cores.
    epochs, budget, batch = {"fashion-mnist": (10, 4, 128), "digits": (30, 10, 64)}[name]
    # a folder is replaced only when a demo made it (its marker file), wherever --out puts it: a run of anyone
    # else's there is kept
    marker = os.path.join(args.out, DEMO_MARKER)
    replace = args.overwrite or (not args.resume and (os.path.exists(marker) or not _holds_run(args.out)))
    argv = ["compress", "--model", "lenet5", "--data", name, "--target-params", "0.2", "--accuracy-floor", "0.03",
            "--epochs", str(epochs), "--epoch-budget", str(budget), "--batch-size", str(batch), "--no-grow",
            "--out", args.out] + (["--data-dir", args.data_dir] if args.data_dir else []) \
        + (["--overwrite"] if replace else []) + (["--resume"] if args.resume else []) \
        + (["--quiet"] if args.quiet else [])
    print(f"gpp demo: LeNet-5 on {name}: gpp {' '.join(argv)}", flush=True)
    compress = _parser().parse_args(argv)
    compress.demo_marker = marker
    return _compress(compress)


def _holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in RUN_FILES)


def _report(args) -> int:
    from .report import read_report, summary_table, verdicts

    folder = args.dir
    if os.path.basename(folder) == "report.json" and os.path.isfile(folder):  # the file itself
        folder = os.path.dirname(folder) or "."
    report = read_report(folder)  # ValueError (exit 2) for a missing, damaged, partial or stale report
    print(summary_table(report))
    iterations = len(report["iterations"])
    print(f"stopped: {report['stopped']}; {iterations} iteration{'s' * (iterations != 1)}; "
          f"{report['seconds']:.0f} s")
    for missed, line in verdicts(report):
        print(("MISSED: " if missed else "") + line)
    return 0


def _export(args) -> int:
    from . import export, io

    if not args.onnx and not args.torchscript:
        raise ValueError("gpp export: give --onnx FILE and/or --torchscript FILE")
    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"gpp export: no model file {args.model}" + (" (it is a folder)" if
                                                                             os.path.isdir(args.model) else ""))
    targets = [(option, path) for option, path in (("--onnx", args.onnx), ("--torchscript", args.torchscript)) if path]
    for option, path in targets:
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            raise ValueError(f"gpp export {option} {path}: is a folder; give the file to write, e.g. "
                             f"{os.path.join(path, 'model' + ('.onnx' if option == '--onnx' else '.ts.pt'))}")
        if _same_file(path, args.model):
            raise ValueError(f"gpp export {option} {path}: that is the model file being exported; writing there "
                             f"would replace it. Give another file")
    if len(targets) == 2 and _same_file(args.onnx, args.torchscript):
        raise ValueError(f"gpp export: --onnx and --torchscript name the same file {args.onnx}; give two files")
    # the model first: a file that is not a model is the error to report, whatever the shape
    model = io.load(args.model, factory=args.factory, trust_code=args.trust_model_code)
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise ValueError(f"gpp export: --input-shape must be comma-separated sizes, e.g. 1,28,28, got "
                             f"{args.input_shape!r}") from None
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.model)), "report.json")
        try:
            with open(beside) as f:
                shape = tuple(json.load(f)["input_shape"])
            if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
                raise ValueError("not a shape")
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"gpp export: no input shape: pass --input-shape (e.g. 1,28,28); there is no readable "
                             f"report.json with input_shape beside {args.model}") from None
    if args.onnx:
        try:
            export.check_onnx_available()
        except ImportError as error:
            raise ValueError(f"gpp export --onnx: {error}") from None
        done = export.to_onnx(model, args.onnx, shape, opset=args.opset, dynamic_batch=args.dynamic_batch)
        batch = "dynamic batch" if done["dynamic_batch"] else "batch 1"
        latency = [f"b={b}: {export.onnx_latency_ms(args.onnx, shape, b):.3f} ms"
                   for b in ((1, 64) if done["dynamic_batch"] else (1,))]
        print(f"gpp export: {args.onnx} (opset {done['opset']}, {batch}); max |ONNX Runtime - PyTorch| = "
              f"{done['max_abs_diff']:.2e} at batch {done['checked_batches']}; ONNX Runtime CPU latency "
              + ", ".join(latency))
    if args.torchscript:
        done = export.to_torchscript(model, args.torchscript, shape)
        print(f"gpp export: {args.torchscript} (TorchScript); max |torch.jit.load - PyTorch| = "
              f"{done['max_abs_diff']:.2e} at batch {done['checked_batches']}")
    return 0


def _same_file(a: str, b: str) -> bool:
    """The two paths name one file (existing or not: links and relative paths resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _criteria(args) -> int:
    described = criteria.describe()
    default = recipes.build("gpp").criterion
    width = max(map(len, described)) + len(" (default)")
    for name, summary in described.items():
        print(f"{name + (' (default)' if name == default else ''):<{width}}  {summary}")
    return 0


def _os_error(error: OSError) -> str:
    """`cannot write PATH: No space left on device; free some space ...` from an OSError raised anywhere."""
    import errno

    path = error.filename or ""
    what = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some space or choose another folder", errno.EDQUOT: "free some space or choose "
            "another folder", errno.EFBIG: "the file system or a limit (ulimit -f) refuses a file this large",
            errno.EACCES: "choose a place you may write to", errno.EPERM: "choose a place you may write to",
            errno.EROFS: "the disk is read-only; choose another folder",
            errno.EISDIR: "give a file, not a folder"}.get(error.errno)
    return f"{path}: {what}" + (f"; {hint}" if hint else "") if path else what + (f"; {hint}" if hint else "")


def _said(error: Exception) -> str:
    """An error's line on stderr, prefixed `gpp: ` unless it names its command already (`gpp export: ...`)."""
    import re

    text = re.sub(r"\b(resume|overwrite)=True \((--\1)\)", r"\2", str(error))  # the API's name beside the flag
    return text if text.startswith("gpp ") else f"gpp: {text}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "demo":
            code = _demo(args)
            print(f"gpp demo: done in {time.perf_counter() - started:.0f} s")
            return code
        if args.command == "criteria":
            return _criteria(args)
        if args.command == "export":
            return _export(args)
        return _report(args)
    except FileNotFoundError as error:
        print(_said(error), file=sys.stderr)
        return 1
    except OSError as error:  # no space, no permission, a read-only disk: one line naming the path
        print(f"gpp: {_os_error(error)}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(_said(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpp: interrupted; run the same command with --resume to continue from the last stage",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
