"""The methods the compression benchmark compares, each as it is meant to be run within the shared budget.

Every method gets a prepared copy of the same base model and returns `(before_cut, after_cut, epochs_used)`:
the model at the end of its preparation, the model right after its cut (BatchNorm not yet recalibrated), and
the training epochs it spent before the common fine-tuning (which then gets the rest of the epoch budget).

- One-shot criteria (ours: `l1`, `taylor`, `random`, `gpp-nopush` = the traced discriminant utility `lda`,
  and any other registered criterion; Torch-Pruning's `magnitude`, local and global) spend nothing before
  the cut: their whole budget is fine-tuning, their own best recipe.
- Sparse training before the cut: `slimming` (L1 on BatchNorm scales, then BN-scale pruning),
  `torch_pruning:bn_scale_sl:<scope>` (`BNScalePruner.regularize`) and `torch_pruning:group_norm_sl:<scope>`
  (`GroupNormPruner.regularize`), with the regularisation strength chosen on validation (`SWEEPS`).
- A fading removal set: `gpp` (the library's loop stages with `push="fade"`: the removal set chosen by the
  traced discriminant utility fades to zero, the push terms act on the kept features) and `hesso_style` (our
  implementation of a HESSO-style peer: the same fade, driven by OTO's default saliency and ranked globally
  without per-layer normalisation, since `only-train-once` 3.0.1 does not import under torch 2.13).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gpp_ext
from gpp_ext.classifier import find_classifier
from gpp_ext.cost import count_flops, count_params
from gpp_ext.fade import RemovalFade
from gpp_ext.layers import is_batch_norm
from gpp_ext.loop import LoopConfig, prune_stage, push_stage, stage_seed
from gpp_ext.pruning import criteria
from gpp_ext.pruning.criteria import per_channel
from gpp_ext.training import fit, training_batches

TP_MAGNITUDE = ("torch_pruning:magnitude:local", "torch_pruning:magnitude:global")
TP_SPARSE = tuple(f"torch_pruning:{kind}_sl:{scope}" for kind in ("bn_scale", "group_norm")
                  for scope in ("local", "global"))
FIXED = ("gpp", "gpp-nopush", "slimming", "hesso_style")
# regularisation strengths tried on validation (seed 0, one budget per model) for the sparse-training methods
SWEEPS = {"slimming": (1e-5, 1e-4, 1e-3), "torch_pruning:bn_scale_sl": (1e-5, 1e-4, 1e-3),
          "torch_pruning:group_norm_sl": (1e-5, 1e-4, 1e-3)}


@dataclass
class Setup:
    """What every method gets: the data, the budget, the seed and the shared training settings."""

    splits: object
    budget: float                    # fraction of the base cost to keep
    kind: str                        # "params" or "flops"
    seed: int
    epochs: float                    # training after the base, preparation and fine-tuning together
    prep_epochs: float               # what methods that train before their cut may spend on it
    lr: float
    batch_size: int = 128
    knobs: dict = field(default_factory=dict)   # method-specific settings (a sweep's reg, gpp's push knobs)

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(2, *self.splits.input_shape)

    def cost(self, model) -> int:
        return count_flops(model, self.example) if self.kind == "flops" else count_params(model)

    def loader(self, offset: int = 0) -> DataLoader:
        return training_batches(self.splits.train, 256, self.seed * 7 + offset)


def sweep_key(method: str) -> str | None:
    """The sweep a method's regularisation comes from (local and global share one)."""
    for key in SWEEPS:
        if method == key or method.startswith(key + ":"):
            return key
    return None


def known(tp_available: bool) -> list:
    names = list(FIXED) + [c for c in criteria.names() if c != "lda"]
    return names + (list(TP_MAGNITUDE + TP_SPARSE) if tp_available else [])


def prep_key(method: str, setup: Setup) -> str | None:
    """A name for a method's preparation when it does not depend on the budget (sparse training), so that it is
    trained once per seed and regularisation strength and shared; None otherwise."""
    if method == "slimming" or method in TP_SPARSE:
        family = sweep_key(method)
        return f"{family.replace(':', '_')}-reg{setup.knobs.get('reg', 1e-4):g}-prep{setup.prep_epochs:g}"
    return None


def run(method: str, base, setup: Setup, cached=None):
    """`(before_cut, after_cut, epochs_used)` of `method` on a copy of `base`. `cached(key, build)` (optional)
    returns a stored preparation or builds and stores it (see `prep_key`)."""
    model = copy.deepcopy(base)
    key = prep_key(method, setup)
    if cached is None or key is None:
        def cached(key, build):
            return build()
    if method == "gpp":
        return _gpp(model, setup)
    if method == "hesso_style":
        return _hesso_style(model, setup)
    if method == "slimming":
        return _slimming(cached(key, lambda: _slimming_prep(model, setup)), setup)
    if method in TP_SPARSE:
        return _torch_pruning(method, cached(key, lambda: _tp_sparse_prep(method, model, setup)), setup,
                              used=setup.prep_epochs)
    if method in TP_MAGNITUDE:
        return _torch_pruning(method, model, setup)
    criterion = "lda" if method == "gpp-nopush" else method
    cut, _ = gpp_ext.prune(copy.deepcopy(model), setup.loader(), setup.example, setup.splits.num_classes,
                           criterion=criterion, method="budget", budget=setup.budget, budget_kind=setup.kind,
                           recalibrate=False, progress=False, seed=setup.seed)
    return model, cut, 0.0


# ---------------------------------------------------------------------------------------------------- ours

GPP_DEFAULTS = dict(iterations=1, push_share=None, reselect=4, schedule="cosine", fade_end=1.0, alpha=0.3,
                    beta=0.3, gamma=0.05, distill=0.0, criterion="lda", allocation="global", normalize="mean")


def gpp_config(setup: Setup, **overrides) -> LoopConfig:
    """The loop configuration of the `gpp` method: the budget schedule with a fading push, the whole epoch
    budget but the last fine-tuning given to `iterations` push-cut-fine-tune steps."""
    k = {**GPP_DEFAULTS, **setup.knobs, **overrides}
    target = setup.budget
    share = k["push_share"] if k["push_share"] is not None else setup.prep_epochs / setup.epochs
    return LoopConfig(epochs=0, batch_size=setup.batch_size, lr=setup.lr, schedule="budget", push="fade",
                      budget_kind=setup.kind, target_params=target if setup.kind == "params" else 1.0,
                      target_flops=target if setup.kind == "flops" else None, max_iterations=k["iterations"],
                      epoch_budget=setup.epochs, push_share=share, fade_reselect=k["reselect"],
                      fade_schedule=k["schedule"], fade_end=k["fade_end"], alpha=k["alpha"], beta=k["beta"],
                      gamma=k["gamma"], distill=k["distill"], criterion=k["criterion"],
                      allocation=k["allocation"], normalize=k["normalize"], seed=setup.seed,
                      # harness 3's training inside the push, spelled out now that LoopConfig's defaults changed
                      lr_schedule="constant", optimizer="adamw", weight_decay=1e-4, floor=0.0, round_to=1,
                      fade_fixed_widths=False)


def _gpp(model, setup: Setup):
    """The library's loop, stage by stage: n x (push with the fade, lossless cut, fine-tune), the last
    fine-tuning left to the harness (same optimiser and schedule as every method)."""
    config = gpp_config(setup)
    config.validate()
    base_cost = setup.cost(model)
    push_epochs, ft_epochs = (setup.epochs / config.max_iterations * config.push_share,
                              setup.epochs / config.max_iterations * (1 - config.push_share))
    used = 0.0
    for i in range(1, config.max_iterations + 1):
        if i > 1:  # the fine-tuning between cuts; the last one is the harness's
            model = fit(model, setup.splits.train, ft_epochs, lr=setup.lr, batch_size=setup.batch_size,
                        seed=stage_seed(setup.seed, 3 * i), lr_schedule="cosine")
            used += ft_epochs
        model, keep = push_stage(model, setup.splits, config, stage_seed(setup.seed, 3 * i + 1), iteration=i,
                                 base_cost=base_cost)
        used += push_epochs
        before = copy.deepcopy(model)
        model, _ = prune_stage(model, setup.splits, config, i, base_cost, stage_seed(setup.seed, 3 * i + 2),
                               keep=keep, recalibrate=False)
    return before, model, used


def _slimming_prep(model, setup: Setup):
    reg = setup.knobs.get("reg", 1e-4)

    def penalty(m):
        return reg * sum(b.weight.abs().sum() for b in m.modules() if is_batch_norm(b) and b.weight is not None)

    return fit(model, setup.splits.train, setup.prep_epochs, lr=setup.lr, batch_size=setup.batch_size,
               seed=setup.seed, penalty=penalty)


def _slimming(model, setup: Setup):
    cut, _ = gpp_ext.prune(copy.deepcopy(model), setup.loader(), setup.example, setup.splits.num_classes,
                           criterion="bn_scale", method="budget", budget=setup.budget, budget_kind=setup.kind,
                           recalibrate=False, progress=False)
    return model, cut, setup.prep_epochs


# ------------------------------------------------------------------------------------ the HESSO-style peer

def hesso_saliency(graph, context) -> dict:
    """OTO's default HESSO saliency, per channel over the tensors that produce it: magnitude, average
    magnitude, cosine similarity of weights and gradient (+1), first- and second-order Taylor, each normalised
    by its L2 norm over all channels of all groups and weighted 0.2.

    As in OTO, the average magnitude divides a channel's norm by the number of weights that produce it, and the
    removal set is the globally lowest-scored channels (OTO's `target_group_sparsity` picks the K lowest; a
    parameter budget fixes K, and our threshold on the same scores picks the same set), with at least one
    channel kept per group. A wide-input layer therefore scores lowest and, holding the most parameters per
    channel, pays most of a parameter budget: at 25% of VGG-BN's parameters the hidden `fc` layer keeps 1 of its
    256 neurons. That is the saliency's behaviour under a parameter budget, not a slip of this port."""
    model = graph.model
    inputs, labels = context.batch()
    was_training = model.training
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(model(inputs), labels).backward()
        parts = {}
        for group in graph.groups:
            sq = inner = gsq = count = torch.zeros(group.size, dtype=torch.float64)
            for p in graph.channel_params(group.name):
                if p.role == "consumer" or p.attr.startswith("running_") or p.tensor.grad is None:
                    continue
                w, g = p.tensor.detach(), p.tensor.grad.detach()
                sq = sq + per_channel(p, w * w)
                inner = inner + per_channel(p, w * g)
                gsq = gsq + per_channel(p, g * g)
                count = count + per_channel(p, torch.ones_like(w))
            magnitude = sq.sqrt()
            taylor1 = inner.abs()
            parts[group.name] = {"magnitude": magnitude, "avg_magnitude": magnitude / (count + 1e-6),
                                 "cosine_similarity": inner / (magnitude + 1e-8) / (gsq.sqrt() + 1e-8) + 1,
                                 "taylor_first_order": taylor1, "taylor_second_order": 0.5 * taylor1 ** 2}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    names = ("magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order")
    norms = {n: float(torch.cat([v[n] for v in parts.values()]).norm()) + 1e-12 for n in names}
    return {g: sum(0.2 * v[n] / norms[n] for n in names).clamp_min(0) for g, v in parts.items()}


def _hesso_style(model, setup: Setup):
    k = {**GPP_DEFAULTS, **setup.knobs}
    fade = RemovalFade(model, setup.example, setup.loader(), setup.budget, budget_kind=setup.kind,
                       criterion=hesso_saliency, reselect=k["reselect"], schedule="linear", normalize="none",
                       seed=setup.seed)
    model = fit(model, setup.splits.train, setup.prep_epochs, lr=setup.lr, batch_size=setup.batch_size,
                seed=setup.seed, after_step=fade.step)
    keep = fade.finish()
    before = copy.deepcopy(model)
    cut, _ = gpp_ext.prune(model, setup.loader(), setup.example, setup.splits.num_classes, keep=keep,
                           recalibrate=False, progress=False, inplace=True)
    return before, cut, setup.prep_epochs


# --------------------------------------------------------------------------------------------- Torch-Pruning

def _tp_pruner(tp, method: str, model, setup: Setup, ratio: float):
    _, kind, scope = method.split(":")
    classifier = dict(model.named_modules())[find_classifier(model)]
    common = dict(pruning_ratio=ratio, global_pruning=scope == "global", ignored_layers=[classifier])
    example = torch.zeros(1, *setup.splits.input_shape)
    if kind == "magnitude":
        return tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                         **common)
    reg = setup.knobs.get("reg", 1e-4)
    if kind == "bn_scale_sl":
        return tp.pruner.BNScalePruner(model, example, importance=tp.importance.BNScaleImportance(), reg=reg,
                                       **common)
    return tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                     reg=reg, **common)


def _tp_sparse_prep(method: str, model, setup: Setup):
    """Torch-Pruning's sparse learning: regularize() between backward and step, no weight decay (its recipe).
    The regulariser does not depend on the scope or the ratio, so local and global share this preparation."""
    import torch_pruning as tp

    pruner = _tp_pruner(tp, method, model, setup, 0.5)
    return fit(model, setup.splits.train, setup.prep_epochs, lr=setup.lr, weight_decay=0.0,
               batch_size=setup.batch_size, seed=setup.seed, after_backward=lambda m: pruner.regularize(m))


def _torch_pruning(method: str, model, setup: Setup, used: float = 0.0):
    import torch_pruning as tp

    target = setup.budget * setup.cost(model)

    def cut(ratio):
        m = copy.deepcopy(model)
        torch.manual_seed(setup.seed)
        _tp_pruner(tp, method, m, setup, ratio).step()
        m.zero_grad(set_to_none=True)
        return m

    lo, hi = 0.0, 0.99
    for _ in range(12):  # the smallest channel ratio that meets the budget
        mid = 0.5 * (lo + hi)
        if setup.cost(cut(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return model, cut(hi), used


def with_knobs(setup: Setup, **knobs) -> Setup:
    return replace(setup, knobs={**setup.knobs, **knobs})
