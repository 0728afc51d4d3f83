"""Training, evaluation and timing: the one implementation the loop, the benchmarks and the demo all call, so
that what the benchmarks measure is what users run.

- `fit` trains with cross-entropy, or with a `PushLoss` (pre-decision features captured by a
  `PreDecisionTap`, class-balanced batches so every batch has the class statistics the push needs), plus an
  optional extra penalty on the model (e.g. network slimming's L1 on BatchNorm scales). Under
  `torch.distributed` it trains under `DistributedDataParallel`, each process taking its slice of the same
  global batches, so the result is that of one process on the global batch.
- `evaluate` (accuracy), `latency_ms` (median CPU time of a forward pass), `compare_latency` (several models
  timed interleaved in one window, for a ratio that can be trusted), `recalibrate_batchnorm` (re-estimate
  BatchNorm statistics after a structural change) and `labelled_batches` (checked `(inputs, labels)` batches
  of any loader).

Randomness: `fit(seed=s)` seeds the global generator (dropout, ...) and the batch order with `s`, so a run is
reproducible and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from . import distributed as gdist
from .checkpoints import FitCheckpoint, hook_owner, order_generators, start_digest
from .classifier import PreDecisionTap
from .data import labels_of
from .layers import BATCH_NORMS
from .push import ClassBalancedSampler

__all__ = ["fit", "lr_factor", "LR_SCHEDULES", "OPTIMIZERS", "MEMORY_FORMATS", "training_batches", "evaluate",
           "latency_ms", "compare_latency", "recalibrate_batchnorm", "labelled_batches", "fast_layout"]


def labelled_batches(loader, device, limit: int | None = None, op: str = "prune"):
    """`(inputs, labels)` of each batch of `loader`, moved to `device`, at most `limit` batches."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(f"{op}: loader must yield (inputs, labels) pairs")
        yield batch[0].to(device), batch[1].to(device)


def training_batches(dataset, batch_size: int, seed: int, balanced: bool = False,
                     sliced: bool = False) -> DataLoader:
    """The batches of one training stage.

    Args:
        dataset: a labelled `Dataset`.
        batch_size: the global batch size.
        seed: seeds the order (one permutation per epoch, drawn from a generator seeded once).
        balanced: the same number of samples of every class in each batch (`ClassBalancedSampler`; the batch is
            at least one sample per class).
        sliced: under `torch.distributed`, this process's slice of each global batch.
    """
    generator = None
    if balanced:
        labels = labels_of(dataset)
        classes = int(labels.unique().numel())
        batches = ClassBalancedSampler(labels, max(batch_size, classes), seed=seed)
    else:
        # what DataLoader(shuffle=True, generator=g) builds, spelled out so that it can be sliced per process
        generator = torch.Generator().manual_seed(seed)
        batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    if sliced and gdist.is_distributed():
        batches = gdist.RankSlicedBatchSampler(batches)
    return DataLoader(dataset, batch_sampler=batches, generator=generator)


def _labels_digest(dataset) -> str | None:
    """A digest of a tensor data set's labels (read without its inputs), so a checkpoint is not resumed on other
    data of the same size; None for data sets whose labels would have to be read sample by sample."""
    import hashlib

    from torch.utils.data import Subset, TensorDataset

    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    if not isinstance(inner, TensorDataset) or len(inner.tensors) < 2:
        return None
    labels = labels_of(dataset).to(torch.int64).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(labels).hexdigest()[:16]


def fit(model: nn.Module, dataset, epochs: float, *, lr: float = 2e-3, weight_decay: float = 1e-4,
        batch_size: int = 128, seed: int = 0, push=None, penalty=None, teacher: nn.Module | None = None,
        distill: float = 0.0, temperature: float = 4.0, lr_schedule: str = "constant", after_step=None,
        after_backward=None, device="cpu", amp: bool = False, progress: bool = False,
        desc: str = "training", optimizer: str = "adamw", warmup: float = 0.1,
        memory_format: str = "auto", checkpoint=None) -> nn.Module:
    """Trains `model` on `dataset` (AdamW by default) and returns it in eval mode (it is trained in place).

    Args:
        model: a classifier; with `push`, its final classifier's input is the pre-decision layer
            (`gpp_ext.classifier`).
        dataset: a labelled `Dataset` of `(input, label)` pairs.
        epochs: passes over the data; a fraction trains that share of an epoch's batches (0: nothing).
        lr, weight_decay, batch_size: AdamW's learning rate and decoupled weight decay; the global batch size.
        seed: seeds the batch order and the global generator (dropout).
        push: a `gpp_ext.push.PushLoss` (or any `(logits, features, labels) -> loss`) to train with instead of
            plain cross-entropy, on class-balanced batches.
        penalty: `penalty(model) -> scalar tensor` added to the loss (e.g. an L1 on BatchNorm scales).
        teacher, distill, temperature: with a teacher and `distill > 0`, adds
            `distill * T^2 * KL(softmax(teacher / T) || softmax(model / T))` (knowledge distillation; the
            teacher runs in eval mode without gradients).
        lr_schedule: the learning rate over the steps of this call (`lr_factor`): "constant"; "cosine" (from
            `lr` down to 0); "warmup-cosine" (linear warm-up from 0 over the first `warmup` share of the steps,
            then cosine down to 0); "onecycle" (warm-up from lr/25 to lr over the first `warmup` share, then
            cosine down to lr/25e4, as torch's OneCycleLR). Each call is one whole schedule, so a phase of the
            loop (base training, push, fine-tuning) ends annealed.
        optimizer: "adamw" (decoupled weight decay), or "sgd" (momentum 0.9, Nesterov, L2 weight decay).
        warmup: the warm-up share of the steps for "warmup-cosine" and "onecycle", in [0, 1).
        after_step: `after_step(step, total_steps)`, called after every optimiser step (steps from 1), e.g. to
            apply a fade or to measure accuracy along the way.
        after_backward: `after_backward(model)`, called between the backward pass and the optimiser step (e.g. a
            regulariser that edits gradients, as Torch-Pruning's sparse-learning pruners do).
        device: where the model trains.
        amp: mixed precision on CUDA: the forward passes run under bfloat16 autocast (no loss scaling needed);
            the losses, the push statistics (float64) and the weights stay in float32. CUDA only.
        progress: a progress bar per epoch (on terminals only).
        desc: the bar's label.
        memory_format: "auto" trains a model with 2-D convolutions on the CPU in channels-last layout (oneDNN's
            fast path: steps 1.15x faster on VGG-BN, 1.3x on ResNet-20, 1.3-1.7x on the Inception net, the same on
            LeNet-5; `benchmarks/results/training.md`) when a probe forward pass accepts it (a `.view` that needs the
            default layout does not), and in the default layout otherwise; "channels_last" insists (an error
            if the model cannot run so), "contiguous" never converts. The model's tensors are converted back
            before `fit` returns, so the caller's model keeps its layout.
        checkpoint: a file path (`gpp_ext.checkpoints`): the run's whole state (weights, optimiser, schedule,
            batch order, random generators, the push's moving statistics, and the state of an `after_step` hook
            that has `state_dict()` / `load_state_dict()`; a hook without them is taken to be stateless) is
            written there atomically after every epoch, and a call that finds the
            checkpoint of the same run there (same arguments, data size and starting weights) goes on after its
            last saved epoch, ending exactly where an uninterrupted run ends. When training ends the file stays,
            marked done (the same call again returns the trained weights at once); remove it when you no longer
            need it. A file of another run at that path is refused (`ValueError`), never overwritten.

    Under `torch.distributed` every process must call `fit` with the same arguments: the model trains under
    `DistributedDataParallel` (wrapped for this call only, so a model pruned between calls is wrapped afresh),
    cross-entropy is this process's share of the global batch mean, and the push statistics are those of the
    global batch.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"fit: lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fit: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"fit: warmup must be in [0, 1) (a share of the steps), got {warmup!r}")
    if epochs < 0 or distill < 0 or temperature <= 0:
        raise ValueError(f"fit: epochs and distill must be >= 0 and temperature > 0, got {epochs}, {distill}, "
                         f"{temperature}")
    if distill > 0 and teacher is None:
        raise ValueError("fit: distill > 0 needs a teacher model")
    if amp and torch.device(device).type != "cuda":
        raise ValueError(f"fit: amp (mixed precision) needs a CUDA device, got device={device!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"fit: memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if epochs <= 0:
        return model
    saved = None
    if checkpoint is not None:  # read (and refused if another run's) before any training
        checkpoint = FitCheckpoint(checkpoint, dict(
            epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed, push=push is not None,
            penalty=penalty is not None, teacher=teacher is not None, distill=distill, temperature=temperature,
            lr_schedule=lr_schedule, optimizer=optimizer, warmup=warmup, samples=len(dataset),
            labels=_labels_digest(dataset),
            hook=type(hook_owner(after_step)).__name__ if hook_owner(after_step) is not None else None,
            start=start_digest(model)))
        saved = checkpoint.load()
    torch.manual_seed(seed)  # dropout and any other global draws
    model.to(device)
    layout, converted = _to_fast_layout(model, _first_input(dataset), device, memory_format,
                                        teacher if distill > 0 else None)
    tap = None
    try:
        model.train()
        distributed = gdist.is_distributed()
        net = DistributedDataParallel(model) if distributed else model
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                  weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        loader = training_batches(dataset, batch_size, seed, balanced=push is not None, sliced=True)
        total = max(1, int(round(epochs * len(loader))))
        passes = math.ceil(total / len(loader))
        scheduler = (torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: lr_factor(lr_schedule, i + 0.5, total, warmup)) if lr_schedule != "constant" else None)
        if teacher is not None and distill > 0:
            teacher = teacher.to(device).eval()
        tap = PreDecisionTap(model) if push is not None else None
        step, first = 0, 0
        generators, owner = order_generators(loader), hook_owner(after_step)
        if saved is not None:  # go on after the last saved epoch, as if never interrupted
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            for g, state in zip(generators, saved["generators"]):
                g.set_state(state)
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None and torch.device(device).type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"], device)
            if owner is not None and saved.get("hook") is not None:
                owner.load_state_dict(saved["hook"])
            if isinstance(push, nn.Module) and saved.get("push") is not None:
                push.load_state_dict(saved["push"])
            step, first = saved["step"], saved["epoch"]
        for epoch in range(first, passes):
            bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{passes}", leave=False,
                       disable=None if progress else True, total=min(len(loader), total - step))
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                if layout is not None and x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    logits = net(x)
                logits = logits.float()
                if push is not None:
                    loss = push(logits, tap.features.float(), y)
                elif distributed:  # this process's share of the global batch mean (see loss_scale)
                    loss = F.cross_entropy(logits, y, reduction="sum") * gdist.loss_scale(y.shape[0])
                else:
                    loss = F.cross_entropy(logits, y)
                if penalty is not None:
                    loss = loss + penalty(model)
                if teacher is not None and distill > 0:
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                        target = F.softmax(teacher(x).float() / temperature, dim=1)
                    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="sum")
                    kd = kd * (gdist.loss_scale(y.shape[0]) if distributed else 1.0 / max(y.shape[0], 1))
                    loss = loss + distill * temperature ** 2 * kd
                loss.backward()
                if after_backward is not None:
                    after_backward(model)
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if after_step is not None:
                    after_step(step, total)
                if step >= total:
                    break
            if checkpoint is not None and gdist.rank() == 0:
                checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                 "generators": [g.get_state() for g in generators], "rng": torch.get_rng_state(),
                                 "cuda_rng": torch.cuda.get_rng_state(device)
                                 if torch.device(device).type == "cuda" else None,
                                 "hook": owner.state_dict() if owner is not None else None,
                                 "push": push.state_dict() if isinstance(push, nn.Module) else None,
                                 "step": step, "epoch": epoch + 1, "done": step >= total})
    finally:
        if tap is not None:
            tap.close()
        for m in converted:  # the caller's model (and teacher) back in the layout they came in
            _to_default_layout(m)
    return model.eval()


LR_SCHEDULES = ("constant", "cosine", "warmup-cosine", "onecycle")
OPTIMIZERS = ("adamw", "sgd")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@contextlib.contextmanager
def fast_layout(model: nn.Module, sample, device="cpu", memory_format: str = "auto", teacher=None,
                training: bool = True):
    """Runs the block with `model` (and `teacher`) in the memory layout their convolutions are fastest in, and
    yields the layout the block must give its 4-D inputs (None: leave them as they are); the networks are
    converted back when the block ends, however it ends.

    `memory_format`: "auto" picks channels-last for a model with 2-D convolutions on the CPU (oneDNN's fast
    path) when a probe forward pass of `sample` (one input, `[C, H, W]`) in eval mode accepts it (a `.view`
    that needs the default layout does not) and no layer is one that torch trains unsafely in that layout (a
    strided 1x1 convolution on a number of channels that is not a multiple of 8), else the default layout;
    "channels_last" insists (`ValueError` if the model cannot run so); "contiguous" never converts. A network
    that is already channels-last is used as it is and left so (with a `RuntimeWarning` when it holds such an
    unsafe layer, torch runs on one thread and the block trains: `training=False` for a block that only runs
    forward passes, where that layer is safe)."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    layout, converted = _to_fast_layout(model, sample, device, memory_format, teacher, training)
    try:
        yield layout
    finally:
        for m in converted:
            _to_default_layout(m)


def _first_input(dataset):
    """The first input of a map-style data set (None for one that cannot be indexed)."""
    try:
        return dataset[0][0]
    except (TypeError, IndexError, KeyError, NotImplementedError):
        return None


def _to_fast_layout(model: nn.Module, x, device, memory_format: str, teacher=None, training: bool = True) -> tuple:
    """`(layout of the input batches, networks converted)` for `fast_layout`."""
    if memory_format == "contiguous" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None, []
    if memory_format == "auto" and torch.device(device).type != "cpu":
        return None, []  # measured on CPUs only
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        if memory_format == "channels_last":
            raise ValueError("memory_format='channels_last' needs image inputs [C, H, W]")
        return None, []
    nets = [m for m in (model, teacher) if m is not None]
    if memory_format == "auto" and any(_unsafe_in_channels_last(m) for m in nets):
        held = [m for m in nets if _unsafe_in_channels_last(m) and _channels_last(m)]
        if held and training and torch.get_num_threads() == 1:
            warnings.warn(f"{type(held[0]).__name__} is already channels-last and holds a strided 1x1 convolution "
                          "on a number of channels that is not a multiple of 8; torch 2.13 can corrupt the heap "
                          "training that layer channels-last on one thread. It is used as given: convert it with "
                          "`model.to(memory_format=torch.contiguous_format)` first, or train on more threads.",
                          RuntimeWarning, stacklevel=4)
        return None, []
    converted = [m for m in nets if not _channels_last(m)]
    for m in converted:
        m.to(memory_format=torch.channels_last)
    probe = x.unsqueeze(0).repeat(2, 1, 1, 1).to(device).contiguous(memory_format=torch.channels_last)
    try:
        for m in nets:  # in eval mode without gradients: no BatchNorm statistics move
            was_training = m.training
            m.eval()
            try:
                with torch.no_grad():
                    m(probe)
            finally:
                m.train(was_training)
    except RuntimeError as e:
        for m in converted:
            _to_default_layout(m)
        if memory_format == "channels_last":
            raise ValueError(f"memory_format='channels_last' but the model cannot run in that layout: {e}") from e
        return None, []
    return torch.channels_last, converted


def _unsafe_in_channels_last(model: nn.Module) -> bool:
    """True when `model` holds a strided 1x1 convolution whose input channels are not a multiple of 8 (a
    ResNet shortcut after pruning or at a small width). On torch 2.13's CPU build, training such a layer in
    channels-last layout on one thread corrupts the heap (`double free or corruption`, measured with 3, 4 and 6
    input channels on 8x8 to 16x16 inputs; the default layout and two threads ran clean), so "auto" leaves
    these models in the default layout."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels % 8
               for m in model.modules())


def _standard_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _to_default_layout(model: nn.Module) -> None:
    """Every tensor of `model` back in the default layout, with the default strides: `.to(contiguous_format)`
    is not enough, since a tensor with size-1 dimensions (a 1x1 convolution's weight) counts as contiguous in
    both layouts and keeps its channels-last strides, which can send later convolutions in the default layout
    down the channels-last path with conversions around them."""
    def restore(t):
        return t.clone(memory_format=torch.contiguous_format) if t.stride() != _standard_strides(t.shape) else t

    model._apply(restore)


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are already laid out channels-last (those with one channel or a 1x1
    kernel are both layouts at once and say nothing)."""
    weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in weights)


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.1) -> float:
    """The learning rate of step `step` (from 0) of `total`, as a multiple of the peak `lr` (see `fit`)."""
    u = min(max(step, 0), total) / max(total, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * u))
    low = 1 / 25 if schedule == "onecycle" else 0.0
    end = 1 / 25e4 if schedule == "onecycle" else 0.0
    if warmup > 0 and u < warmup:
        return low + (1 - low) * u / warmup
    v = (u - warmup) / (1 - warmup)
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * v))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 128, device="cpu", memory_format: str = "auto") -> float:
    """Accuracy of `model` on a labelled data set, in eval mode (the mode is restored). On the CPU the
    convolutions run channels-last (`fast_layout`; the model is handed back in its own layout): with batches of
    128, 2-2.5x faster than batches of 512 in the default layout on VGG-BN."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with fast_layout(model, _first_input(dataset), device, memory_format, training=False) as layout:
            for x, y in DataLoader(dataset, batch_size=batch_size):
                x = x.to(device)
                if layout is not None and x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                correct += int((model(x).argmax(1) == y.to(device)).sum())
                total += y.numel()
    finally:
        model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape, batch: int, repeats: int = 20) -> float:
    """Median CPU latency of one forward pass of `batch` inputs, in milliseconds (a copy of the model runs)."""
    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(batch, *input_shape)
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def compare_latency(models: dict, input_shape, batch: int, rounds: int = 7, repeats: int = 10,
                    unreliable: float = 1.3) -> dict:
    """CPU latency of several models timed in one window, interleaved, so that they share whatever else the
    machine is doing: a comparison (a speed-up) that `latency_ms` called at two moments cannot give.

    Each model (a copy, in eval mode) is warmed up, then `rounds` rounds each time every model for `repeats`
    forward passes of `batch` inputs (the order alternates between rounds); a round's figure is the median of
    its passes. Returns `{name: {"median_ms", "min_ms", "max_ms"}}` over the rounds, plus, for two models, a
    key "ratio" with the first model's time over the second's: `{"median", "min", "max", "reliable"}` from the
    per-round ratios; `reliable` is False when the rounds disagree by more than a factor `unreliable`
    (max / min), i.e. when the machine was too busy for the ratio to be trusted.
    """
    if not models or rounds < 1 or repeats < 1:
        raise ValueError("compare_latency: give at least one model, rounds >= 1 and repeats >= 1")
    copies = {name: copy.deepcopy(m).cpu().eval() for name, m in models.items()}
    x = torch.randn(batch, *input_shape)
    return time_interleaved({name: (lambda m=m: m(x)) for name, m in copies.items()}, rounds, repeats, unreliable)


def time_interleaved(runs: dict, rounds: int = 7, repeats: int = 10, unreliable: float = 1.3) -> dict:
    """Times the callables `runs` (`{name: fn}`) interleaved in one window: each is warmed up twice, then in
    each of `rounds` rounds (order alternating) run `repeats` times; a round's figure is the median of its runs.
    Returns what `compare_latency` describes (`{name: {"median_ms", "min_ms", "max_ms"}}`, and "ratio" for two
    callables). The one timer behind eager and ONNX Runtime comparisons."""
    if not runs or rounds < 1 or repeats < 1:
        raise ValueError("time_interleaved: give at least one callable, rounds >= 1 and repeats >= 1")
    for fn in runs.values():  # warm-up: allocator, kernels picked, caches
        for _ in range(2):
            fn()
    per_round = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            fn, times = runs[name], []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            per_round[name].append(statistics.median(times))
    out = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)}
           for name, t in per_round.items()}
    if len(order) == 2:
        a, b = (per_round[n] for n in order)
        ratios = [x / max(y, 1e-9) for x, y in zip(a, b)]
        out["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                        "reliable": max(ratios) / max(min(ratios), 1e-12) <= unreliable}
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, num_batches: int = 50, device=None,
                          progress: bool = False, memory_format: str = "auto") -> nn.Module:
    """Re-estimates every BatchNorm's running statistics on training data (after a structural change).

    Resets the running mean/variance, runs `num_batches` batches forward in train mode without gradients with
    a cumulative average (momentum None), then restores the model's modes. On the CPU the convolutions run
    channels-last (`fast_layout`'s `memory_format`). Under `torch.distributed` (a process
    group of more than one process) every process recalibrates on its own batches and the estimates are then
    averaged, so the model stays identical on every process.
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not norms:
        return model
    device = device or next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with contextlib.ExitStack() as stack:
            layout = False  # not chosen yet: on the first batch (`fast_layout`)
            for x, _ in tqdm(labelled_batches(loader, device, num_batches, op="recalibrate_batchnorm"),
                             total=num_batches, desc="recalibrating BN", disable=None if progress else True,
                             leave=False):
                if layout is False:
                    image = isinstance(x, torch.Tensor) and x.dim() == 4
                    layout = stack.enter_context(fast_layout(model, x[0] if image else None, device,
                                                             memory_format, training=False))
                model(x.contiguous(memory_format=layout) if layout is not None and x.dim() == 4 else x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if gdist.is_distributed():
        world = gdist.world_size()
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                if buffer is not None:
                    buffer.copy_(gdist.all_reduce_sum(buffer) / world)
    return model
