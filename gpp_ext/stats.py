"""`ScatterStats`: the sufficient statistics of a labelled feature set, kept in float64.

Counts, class means and the within-class scatter are exactly what discriminant analysis needs, and two of
them merge exactly (Chan's formula), so statistics can be accumulated over batches, saved, merged across
files or all-reduced across processes in any order with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ScatterStats:
    """Per-class statistics of features `x [N, D]` with labels in `[0, C)`.

    Attributes:
        count: `[C]` float64, samples per class.
        mean: `[C, D]` float64, class means (zero for an empty class).
        within: `[D, D]` float64, unnormalised within-class scatter
            `S_w = sum_c sum_{i in c} (x_i - mean_c)(x_i - mean_c)^T`.
    """

    count: torch.Tensor
    mean: torch.Tensor
    within: torch.Tensor

    def __post_init__(self):
        c, m, w = self.count, self.mean, self.within
        if not all(isinstance(t, torch.Tensor) for t in (c, m, w)):
            raise TypeError("ScatterStats: count, mean and within must be tensors")
        if c.dim() != 1 or m.dim() != 2 or w.dim() != 2 or m.shape[0] != c.shape[0] \
                or w.shape != (m.shape[1], m.shape[1]):
            raise ValueError(f"ScatterStats: expected count [C], mean [C, D], within [D, D], got "
                             f"{tuple(c.shape)}, {tuple(m.shape)}, {tuple(w.shape)}")
        if not c.dtype == m.dtype == w.dtype == torch.float64:
            raise TypeError(f"ScatterStats: count, mean and within must be float64, got {c.dtype}, {m.dtype}, "
                            f"{w.dtype}")
        if not c.device == m.device == w.device:
            raise ValueError(f"ScatterStats: count, mean and within must be on one device, got {c.device}, "
                             f"{m.device}, {w.device}")

    @classmethod
    def empty(cls, num_classes: int, dim: int, device=None) -> "ScatterStats":
        """Statistics of no samples: the identity of `merge`."""
        kw = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(num_classes, **kw), torch.zeros(num_classes, dim, **kw), torch.zeros(dim, dim, **kw))

    @property
    def num_classes(self) -> int:
        return self.count.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def num_samples(self) -> float:
        return float(self.count.sum())

    def grand_mean(self) -> torch.Tensor:
        """`[D]` mean of all samples (zero when there are none)."""
        n = self.count.sum()
        return (self.count @ self.mean) / n.clamp_min(1.0)

    def between(self) -> torch.Tensor:
        """`[D, D]` between-class scatter `S_b = sum_c n_c (mean_c - mu)(mean_c - mu)^T`."""
        d = self.mean - self.grand_mean()
        return (d * self.count.unsqueeze(1)).T @ d

    def total(self) -> torch.Tensor:
        """`[D, D]` total scatter `S_t = S_w + S_b = sum_i (x_i - mu)(x_i - mu)^T`."""
        return self.within + self.between()

    def merge(self, other: "ScatterStats") -> "ScatterStats":
        """Exact merge with the statistics of another sample set (see `gpp_ext.ops.merge_scatter`)."""
        from . import ops

        return ops.merge_scatter(self, other)

    __add__ = merge

    def to(self, device) -> "ScatterStats":
        """The statistics on another device (e.g. `.to("cuda")`); they stay float64."""
        return ScatterStats(*(t.to(device=device) for t in (self.count, self.mean, self.within)))

    def detach(self) -> "ScatterStats":
        return ScatterStats(self.count.detach(), self.mean.detach(), self.within.detach())

    def state_dict(self) -> dict:
        """Plain tensors, loadable with `torch.load(..., weights_only=True)`."""
        return {"count": self.count, "mean": self.mean, "within": self.within}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ScatterStats":
        missing = {"count", "mean", "within"} - set(state)
        if missing:
            raise ValueError(f"ScatterStats.from_state_dict: state is missing {sorted(missing)}")
        return cls(*(state[k].to(torch.float64) for k in ("count", "mean", "within")))

    def __repr__(self) -> str:
        return (f"ScatterStats(num_classes={self.num_classes}, dim={self.dim}, "
                f"num_samples={self.num_samples:g}, device={self.mean.device})")
