"""A named registry of handlers, each with a one-line summary and optional extras: what the push methods
(`pushes`) and the growth methods (`growth`) are looked up in by `LoopConfig`, the loop and the CLI."""

from __future__ import annotations


class Registry:
    """`{name: (handler, summary, extras)}` in registration order. `what` names the setting it resolves (the
    errors say "push must be one of ...")."""

    def __init__(self, what: str, where: str):
        self.what, self.where = what, where
        self._entries: dict = {}

    def register(self, name: str, summary: str, **extras):
        """The decorator that registers a handler under a new `name`, with `extras` kept beside it."""
        if not isinstance(name, str) or not name or name in self._entries:
            raise ValueError(f"{self.where}.register: name must be a new non-empty string, got {name!r}")

        def decorate(handler):
            self._entries[name] = (handler, summary, extras)
            return handler
        return decorate

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple:
        return tuple(self._entries)

    def describe(self) -> dict:
        return {name: entry[1] for name, entry in self._entries.items()}

    def get(self, name: str):
        """The handler registered under `name`; `ValueError` naming the choices otherwise."""
        return self._entry(name)[0]

    def extra(self, name: str, key: str):
        """The extra `key` given at registration of `name` (None if it was not given)."""
        return self._entry(name)[2].get(key)

    def _entry(self, name: str):
        if name not in self._entries:
            raise ValueError(f"{self.what} must be one of {self.names()}, got {name!r}")
        return self._entries[name]
