"""Block criticality (docs/design.md §2.7; after Nowak & Corso, "Deep Net Triage", 2018: each block of a
trained network collapsed into a single layer, the network briefly re-trained, and the accuracy it loses read
as how critical the block is).

    results = triage(model, splits, epochs=0.5, distill=0.5)     # one entry per block, in the model's order
    print(triage_table(results))                                # most critical first, with what to do there

A block is a residual block (`pruning.blocks.residual_blocks`, projection shortcuts included) or an Inception
module, or any module named in `blocks`. Collapsing replaces it by one 3x3 convolution with BatchNorm and ReLU
mapping the block's input shape to its output shape (the stride from the two shapes). Every collapsed copy and
the reference (the model itself) get the same short training with the same seed, optionally distilled from the
unchanged model, so a block's `drop` (reference accuracy minus the collapsed copy's, on validation) measures the
block and not the extra training. A large drop says the block carries what a single layer cannot: grow there
first; a drop near zero says it can be pruned hard or collapsed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .cost import count_params
from .training import evaluate, fit, recalibrate_batchnorm, training_batches

__all__ = ["triage", "triage_table", "BlockCriticality", "find_blocks", "collapse", "stage_order"]


@dataclass
class BlockCriticality:
    """One block's triage: its name, input and output shape `[C, H, W]`, its parameters and the single layer's,
    validation accuracy of the collapsed copy, and `drop`, the reference's accuracy minus it."""

    name: str
    in_shape: list
    out_shape: list
    params: int
    layer_params: int
    accuracy: float
    drop: float

    def to_dict(self) -> dict:
        return asdict(self)


def find_blocks(model: nn.Module) -> list:
    """The names of `model`'s blocks, in order: residual blocks and Inception modules (the outermost of
    nested ones)."""
    from .models.inception import InceptionModule
    from .pruning.blocks import residual_blocks

    residual = {name for name, _ in residual_blocks(model, removable_only=False)}
    names = [name for name, m in model.named_modules() if name and (name in residual or
                                                                     isinstance(m, InceptionModule))]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


class _Collapsed(nn.Sequential):
    """The single layer a block is collapsed into: 3x3 convolution, BatchNorm, ReLU."""


def _shapes(model: nn.Module, names, example: torch.Tensor) -> dict:
    modules, seen, hooks = dict(model.named_modules()), {}, []
    for name in names:
        def hook(module, args, out, name=name):
            seen[name] = (list(args[0].shape[1:]), list(out.shape[1:]))
        hooks.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _stride(name: str, in_shape, out_shape, op: str) -> int:
    """The stride of the 3x3 convolution that maps `in_shape` to `out_shape` (`[C, H, W]`), or a clear error."""
    if len(in_shape) != 3 or len(out_shape) != 3:
        raise ValueError(f"{op}: block {name!r} must map [C, H, W] to [C, H, W], got {in_shape} -> {out_shape}")
    stride = max(1, round(in_shape[1] / out_shape[1]))
    if (in_shape[1] - 1) // stride + 1 != out_shape[1] or (in_shape[2] - 1) // stride + 1 != out_shape[2]:
        raise ValueError(f"{op}: block {name!r} maps {in_shape} to {out_shape}, which no strided 3x3 "
                         f"convolution does")
    return stride


def collapse(model: nn.Module, name: str, in_shape, out_shape, seed: int | None = None) -> nn.Module:
    """A copy of `model` with block `name` replaced by one 3x3 conv + BatchNorm + ReLU from `in_shape` to
    `out_shape` (`[C, H, W]`), its weights drawn from `seed` (None: torch's global generator)."""
    stride = _stride(name, in_shape, out_shape, "collapse")
    out = copy.deepcopy(model)
    parent_name, _, child = name.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        layer = _Collapsed(nn.Conv2d(in_shape[0], out_shape[0], 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(out_shape[0]), nn.ReLU())
    setattr(parent, child, layer.to(next(model.parameters()).device))
    return out


def triage(model: nn.Module, splits, epochs: float = 0.5, distill: float = 0.0, blocks=None, seed: int = 0,
           device="cpu", progress: bool = True, **fit_kwargs) -> list:
    """`[BlockCriticality]` for every block of the trained `model` (or those named in `blocks`), in order.

    Args:
        model: a trained classifier (left unchanged: every training runs on a copy, on `device`).
        splits: a `gpp_ext.data.DataSplits`; collapsed copies train on `train`, are scored on `val`.
        epochs: the short training every copy and the reference get (> 0: an untrained single layer says
            nothing about what the block does).
        seed: the trainings' seed; the `i`-th collapsed layer's weights are drawn from `seed + i`.
        distill: weight of distillation from `model` in that training (0: plain cross-entropy).
        blocks: module names to triage (default `find_blocks(model)`).
        fit_kwargs: the training recipe (`fit`'s lr, lr_schedule, optimizer, batch_size, weight_decay, warmup).
    """
    if not epochs > 0 or distill < 0:
        raise ValueError(f"triage: epochs must be > 0 and distill >= 0, got {epochs}, {distill}")
    names = list(find_blocks(model) if blocks is None else blocks)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown or not names:
        raise ValueError(f"triage: {'no blocks to triage' if not names else f'no modules named {unknown}'} in "
                         f"{type(model).__name__}; pass blocks=[module names] (found: {find_blocks(model)})")
    example = torch.zeros(2, *splits.input_shape, device=device)
    model = copy.deepcopy(model).to(device)
    modules = dict(model.named_modules())
    shapes = _shapes(model, names, example)
    for name in names:  # every block collapsible before any training
        if name not in shapes:
            raise ValueError(f"triage: block {name!r} is never called in a forward pass of {type(model).__name__}")
        _stride(name, *shapes[name], "triage")
    teacher = copy.deepcopy(model).eval() if distill > 0 else None

    def train(m):  # then BatchNorm's statistics re-estimated for the trained weights: the running averages of a
        # short training (tens of steps on a small data set) still carry their starting values
        m = fit(m, splits.train, epochs, seed=seed, device=device, teacher=teacher, distill=distill,
                desc="triage", **fit_kwargs)
        return recalibrate_batchnorm(m, training_batches(splits.train, fit_kwargs.get("batch_size", 128), seed + 1),
                                     device=device)

    reference = evaluate(train(copy.deepcopy(model)), splits.val, device=device)
    out = []
    for i, name in enumerate(tqdm(names, desc="triage", leave=False, disable=None if progress else True)):
        in_shape, out_shape = shapes[name]
        collapsed = collapse(model, name, in_shape, out_shape, seed=seed + i)
        layer = collapsed.get_submodule(name)
        accuracy = evaluate(train(collapsed), splits.val, device=device)
        out.append(BlockCriticality(name, in_shape, out_shape, count_params(modules[name]), count_params(layer),
                                    accuracy, reference - accuracy))
    return out


def stage_order(results: list, stages: int) -> list:
    """Stage indices of an Inception net (blocks named `stages.<s>.<i>`), most critical first (by the largest
    drop among a stage's modules; stages without a triaged module last, in order)."""
    worst = {}
    for r in results:
        parts = r.name.split(".")
        if len(parts) >= 2 and parts[0] == "stages" and parts[1].isdigit():
            s = int(parts[1])
            worst[s] = max(worst.get(s, float("-inf")), r.drop)
    return sorted(range(stages), key=lambda s: (s not in worst, -worst.get(s, 0.0), s))


NEGLIGIBLE = 0.005  # a drop of validation accuracy this small (half a point) says a single layer does the work


def triage_table(results: list) -> str:
    """A markdown table of `results`, most critical first, saying where to grow and what to prune."""
    if not results:
        return "no blocks triaged\n"
    ranked = sorted(results, key=lambda r: -r.drop)
    top, bottom = ranked[0].drop, ranked[-1].drop
    lines = ["| block | in -> out | params (block -> layer) | val acc collapsed | drop | what it says |",
             "|---|---|---:|---:|---:|---|"]
    for r in ranked:
        if r.drop == top and top > NEGLIGIBLE + 1e-9:
            hint = "most critical: grow here first, prune lightly"
        elif r.drop <= NEGLIGIBLE + 1e-9:  # one sample of 200 is 0.0050000000000000044
            hint = "a single layer does its work: prune hard or collapse"
        elif r.drop == bottom:
            hint = f"least critical, though a single layer loses {r.drop:.1%}: prune here first"
        else:
            hint = ""
        lines.append(f"| {r.name} | {r.in_shape} -> {r.out_shape} | {r.params:,} -> {r.layer_params:,} | "
                     f"{r.accuracy:.4f} | {r.drop:+.4f} | {hint} |")
    return "\n".join(lines) + "\n"
