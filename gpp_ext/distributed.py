"""Discriminant analysis across processes with `torch.distributed` (docs/design.md §2.1: statistics merge exactly).

    torch.distributed.init_process_group("gloo")        # or "nccl"; torchrun sets the environment
    stats = all_reduce_scatter(local_stats)              # identical on every rank, exact

Every rank holds the `ScatterStats` of its own, disjoint part of the data. Combining them needs no gather:
1. one all-reduce of `[C, D + 1]` float64 (class counts and class sums `n_c·mean_c`) gives every rank the
   global class means;
2. each rank re-centres its within-class scatter on the global means,
   `S_w^r + Σ_c n_c^r (mean_c^r − mean_c)(mean_c^r − mean_c)^T` (Chan's correction term, against the global
   mean instead of a second partial), and one all-reduce of `[D, D]` sums them to the global `S_w`.
Nothing subtracts raw second moments, so float32 features with large means stay as accurate as on one process.
The results of an all-reduce are the same on every rank, and what follows is the same arithmetic on the same
numbers, so every rank ends with bit-identical statistics (and so identical pruning decisions).

`ShardSampler` splits a data set over the ranks without repeating samples (torch's `DistributedSampler` pads
with repeats so every rank has as many batches, which suits DDP training but biases statistics);
`DiscriminantAnalyzer.run` uses it, and `all_reduce_scatter`, by itself when a process group is initialised.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from .stats import ScatterStats

__all__ = ["all_reduce_scatter", "all_reduce_sum", "all_reduce_max", "broadcast_object", "gather_batch",
           "is_distributed", "loss_scale", "rank", "world_size", "ShardSampler", "RankSlicedBatchSampler",
           "shard_loader", "barrier"]


def is_distributed(group=None) -> bool:
    """True when `torch.distributed` is initialised and the group has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    """This process's rank in the group (0 without a process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _collective_device(group, device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU (and CUDA) tensors."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_scatter(stats: ScatterStats, group=None) -> ScatterStats:
    """The statistics of the union of every rank's samples, returned on every rank (exact; two all-reduces).

    Args:
        stats: this rank's `ScatterStats` (`count [C]`, `mean [C, D]`, `within [D, D]`, float64). Every rank
            must pass the same `C` and `D`; a rank without samples passes `ScatterStats.empty(C, D)`. A class
            may be missing on some ranks.
        group: the process group (default: the world).

    Returns the combined `ScatterStats` on the device of `stats`. Without an initialised process group (or with
    one process) it returns `stats` unchanged. Cost: all-reduces of `C·(D + 1)` and `D²` float64 numbers,
    after a 4-number one that checks the shapes agree.
    """
    if not isinstance(stats, ScatterStats):
        raise TypeError(f"all_reduce_scatter: stats must be a ScatterStats, got {type(stats).__name__}")
    if not is_distributed(group):
        return stats
    c, d = stats.num_classes, stats.dim
    # Shapes first (one tiny all-reduce): a mismatch would otherwise hang or fail deep inside the backend.
    device = _collective_device(group, stats.mean.device)
    shape = torch.tensor([c, d, -c, -d], dtype=torch.float64, device=device)
    dist.all_reduce(shape, dist.ReduceOp.MAX, group=group)
    if shape[0] != -shape[2] or shape[1] != -shape[3]:
        raise ValueError(f"all_reduce_scatter: every rank must pass statistics of the same shape; this rank has "
                         f"C={c}, D={d}, the ranks range over C in [{int(-shape[2])}, {int(shape[0])}], D in "
                         f"[{int(-shape[3])}, {int(shape[1])}]")
    count, mean, within = (t.to(device) for t in (stats.count, stats.mean, stats.within))
    sums = torch.cat([count.unsqueeze(1), mean * count.unsqueeze(1)], dim=1)  # [C, 1 + D]
    dist.all_reduce(sums, group=group)
    total = sums[:, 0]
    global_mean = sums[:, 1:] / total.clamp_min(1.0).unsqueeze(1)  # zero for a class no rank has
    shift = (mean - global_mean) * count.unsqueeze(1).sqrt()  # rows of sqrt(n_c^r)(mean_c^r - mean_c)
    scatter = within + shift.T @ shift
    dist.all_reduce(scatter, group=group)
    scatter = 0.5 * (scatter + scatter.T)  # exactly symmetric, as the single-process kernel returns it
    out = stats.mean.device
    return ScatterStats(total.to(out), global_mean.to(out), scatter.to(out))


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if not is_distributed(group):
        return tensor
    device = _collective_device(group, tensor.device)
    work = tensor.to(device, copy=True)
    dist.all_reduce(work, op, group=group)
    return work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise sum of `tensor` over the ranks, as a new tensor on its device (a copy without a group)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise maximum of `tensor` over the ranks, as a new tensor on its device."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` from rank `src` on every rank (any picklable object); `obj` itself without a process group."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class ShardSampler(Sampler):
    """Rank `r` of `W` takes samples `r, r + W, r + 2W, ...` of the data set (in its order, or with
    `shuffle_seed` of one permutation of it drawn from that seed, the same on every rank): every sample exactly
    once over all ranks, shards differing in size by at most one. The statistics of the whole data set do not
    depend on the order; a run cut short (`max_batches`) sees the first samples of each shard, which with the
    permutation are a random subset of every class rather than the start of a data set stored class by class."""

    def __init__(self, dataset, num_replicas: int | None = None, rank_: int | None = None,
                 shuffle_seed: int | None = None):
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"ShardSampler: rank must be in [0, num_replicas), got rank {self.rank} of "
                             f"{self.num_replicas}")
        self.length = len(dataset)
        self.shuffle_seed = shuffle_seed

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.num_replicas))

    def __iter__(self):
        if self.shuffle_seed is None:
            return iter(range(self.rank, self.length, self.num_replicas))
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(int(self.shuffle_seed)))
        return iter(order[self.rank::self.num_replicas].tolist())


def shard_loader(loader, seed: int = 0):
    """This rank's share of `loader`'s data for an exact distributed analysis, or `None` when it cannot be
    derived: a `DataLoader` over a map-style data set batched by a `BatchSampler` around a plain (sequential
    or random) sampler — what `DataLoader(data, batch_size, shuffle=...)` builds — is rebuilt around a
    `ShardSampler` with the same batch size, workers and collate function (a shuffling loader's shards take one
    permutation drawn from `seed`, the same on every rank); one that already samples per rank
    (`DistributedSampler`, `ShardSampler`) is returned as it is."""
    if not isinstance(loader, DataLoader):
        return None
    if isinstance(loader.sampler, (ShardSampler, torch.utils.data.DistributedSampler)):
        return loader
    batches = loader.batch_sampler
    plain = (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)
    if type(batches) is not torch.utils.data.BatchSampler or not isinstance(batches.sampler, plain) or \
            isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    shuffled = isinstance(batches.sampler, torch.utils.data.RandomSampler)
    return DataLoader(loader.dataset, batch_size=batches.batch_size,
                      sampler=ShardSampler(loader.dataset, shuffle_seed=seed if shuffled else None),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=batches.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn)


class RankSlicedBatchSampler(Sampler):
    """Every process's part of the same global batches: process `r` of `W` takes items `r, r + W, ...` of each
    batch of `batch_sampler` (which must produce the same batches on every process, e.g. seeded). The
    processes of a DDP job then train on exactly the batches one process would; local batches differ in size by
    at most one, which `loss_scale` corrects for. A batch smaller than `W` is skipped by every process alike."""

    def __init__(self, batch_sampler, num_replicas: int | None = None, rank_: int | None = None):
        self.batch_sampler = batch_sampler
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"RankSlicedBatchSampler: rank must be in [0, num_replicas), got rank {self.rank} of "
                             f"{self.num_replicas}")

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) >= self.num_replicas:
                yield batch[self.rank::self.num_replicas]


def loss_scale(local_count: int, group=None) -> float:
    """The factor that turns this process's loss *summed* over its `local_count` samples into its share of the
    global batch mean: DDP averages gradients over the `W` processes, so `W / (global count)`. With local
    batches of unequal size, averaging per-process means would weight samples unequally. 1/local_count
    without a process group (the plain mean)."""
    if not is_distributed(group):
        return 1.0 / max(local_count, 1)
    total = float(all_reduce_sum(torch.tensor([float(local_count)], dtype=torch.float64), group)[0])
    return world_size(group) / max(total, 1.0)


class _GatherRows(torch.autograd.Function):
    """All-gather of `[B_r, ...]` tensors along dim 0 (sizes may differ by process), differentiable: the
    gradient of a process's rows is the sum over processes of the gradients their losses put on those rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.group, ctx.sizes = group, sizes
        rank_ = dist.get_rank(group)
        padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.start = sum(sizes[:rank_])
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n = ctx.sizes[dist.get_rank(ctx.group)]
        return grad[ctx.start:ctx.start + n], None, None


def gather_batch(features: torch.Tensor, labels: torch.Tensor, group=None):
    """Every process's `(features [B_r, D], labels [B_r])` concatenated in rank order, identical on every
    process; gradients flow back to each process's own features. Without a process group, the inputs
    unchanged."""
    if not is_distributed(group):
        return features, labels
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"gather_batch: features and labels must have the same number of rows, got "
                         f"{features.shape[0]} and {labels.shape[0]}")
    device = _collective_device(group, features.device)
    counts = torch.zeros(world_size(group), dtype=torch.float64)
    counts[rank(group)] = features.shape[0]
    sizes = [int(n) for n in all_reduce_sum(counts, group).tolist()]
    gathered = _GatherRows.apply(features.to(device), sizes, group).to(features.device)
    flat = _GatherRows.apply(labels.to(device).unsqueeze(1), sizes, group).squeeze(1)
    return gathered, flat.to(labels.device)


def barrier(group=None) -> None:
    """Waits for every process of the group (nothing without one)."""
    if is_distributed(group):
        dist.barrier(group=group)
