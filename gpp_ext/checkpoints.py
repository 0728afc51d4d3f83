"""A training run's state on disk, so a long `fit` interrupted (a killed job, a machine's session ending) goes on
after its last finished epoch and ends exactly where an uninterrupted run would (`fit(checkpoint=path)`).

A checkpoint holds the weights (and every buffer), the optimiser's and the schedule's state, the steps done,
the state of every generator that draws the batch order and of torch's global generator (dropout), and the state
of a stateful `after_step` hook (an object with `state_dict()` / `load_state_dict()`, or a method of one: a fade,
a grow-and-prune schedule). It is written atomically after every epoch and read with `weights_only=True`: only
tensors and plain types, no code runs from it.

It also records which run it belongs to (`run`: the training arguments, the data's size and a SHA-256 of the
starting weights), so a checkpoint is only ever taken up by the same call from the same starting model; a file
at that path made by another run is refused with an error naming it (it is never overwritten: it may be
someone's earlier run). A finished run's checkpoint stays (marked done), so calling the same `fit` again returns
the trained weights at once; the caller removes it (`clear`) once it has what it needs.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn as nn

from .atomic import read, save_atomic
from .io import hash_tensors

__all__ = ["FitCheckpoint", "Hooks", "start_digest", "order_generators", "hook_owner"]

FORMAT = "gpp_ext.fit-checkpoint/1"


def start_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state: every tensor's name, dtype, shape and bytes, in the state's order."""
    h = hashlib.sha256()
    state = model.state_dict()
    hash_tensors(h, state, state)
    return h.hexdigest()


def order_generators(loader) -> list:
    """The `torch.Generator`s a `DataLoader` draws its batch order from: its own, and those of its batch
    sampler and of the samplers that one wraps (`batch_sampler`, `sampler` attributes)."""
    found, seen = [], set()

    def visit(obj, depth=0):
        if obj is None or id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            return
        for attr in ("generator", "batch_sampler", "sampler"):
            visit(getattr(obj, attr, None), depth + 1)

    visit(loader)
    return found


def hook_owner(hook):
    """The object whose state a hook carries: the hook itself when it has `state_dict` and `load_state_dict`, the
    object of a bound method that has them, else None."""
    for obj in (hook, getattr(hook, "__self__", None)):
        if obj is not None and not isinstance(obj, nn.Module) and callable(getattr(obj, "state_dict", None)) \
                and callable(getattr(obj, "load_state_dict", None)):
            return obj
    return None


class Hooks:
    """Several `after_step` hooks called as one, in order; its state is that of each stateful one, so
    `fit(checkpoint=...)` saves and restores them all."""

    def __init__(self, *hooks):
        self.hooks = [h for h in hooks if h is not None]

    def __call__(self, step: int, total: int) -> None:
        for hook in self.hooks:
            hook(step, total)

    def state_dict(self) -> dict:
        return {"hooks": [owner.state_dict() if (owner := hook_owner(h)) is not None else None for h in self.hooks]}

    def load_state_dict(self, state: dict) -> None:
        for hook, saved in zip(self.hooks, state["hooks"]):
            owner = hook_owner(hook)
            if owner is not None and saved is not None:
                owner.load_state_dict(saved)


_ADDED = ("labels",)   # run keys recorded since the first checkpoints: absent from older files, not compared there


class FitCheckpoint:
    """One training run's checkpoint file (`path`) for the run described by `run` (a JSON-able dict)."""

    def __init__(self, path, run: dict):
        self.path = os.fspath(path)
        self.run = json.loads(json.dumps(run, sort_keys=True))

    def load(self) -> dict | None:
        """The saved state of this run, or None when there is no file. Raises `ValueError` naming the file when it
        holds another run's checkpoint (or is not a checkpoint). Under `torch.distributed` rank 0 (the only
        process that writes it) reads it and shares it, so processes on other machines resume from it too."""
        from .run_folder import on_lead

        return on_lead(self._load)

    def _load(self) -> dict | None:
        if not os.path.exists(self.path):
            return None
        state = read(self.path, "fit", what="training checkpoint", hint="; remove it to start over")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"fit: checkpoint {self.path} is not a gpp_ext training checkpoint; move it away or "
                             f"pass another checkpoint path")
        saved = json.loads(state["run"])
        # a checkpoint written before a key was recorded (e.g. the labels' digest) is compared on what it holds
        current = {k: v for k, v in self.run.items() if k in saved or k not in _ADDED}
        if saved != current:
            differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(f"fit: checkpoint {self.path} belongs to another training run (it differs in "
                             f"{', '.join(differ)}); remove it to start over, or pass another checkpoint path")
        return state

    def save(self, state: dict) -> None:
        save_atomic({"format": FORMAT, "run": json.dumps(self.run, sort_keys=True), **state}, self.path)

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
