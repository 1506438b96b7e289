"""One registry mechanism for every extensible kind.

A kind is a string ("component", "loss", "task", "schedule", "weighting",
"degradation", "selection", "recipe", ...).  The config key, the registry name and
the results column are the same string, so a user who registers ``"my_loss"`` can
name it in a YAML file and find it as a column in the leaderboard.

    from scd.core.registry import registry
    LOSSES = registry("loss")

    @LOSSES.register("forward_kl")
    def forward_kl(...): ...

    LOSSES.get("forwrd_kl")  # KeyError: unknown loss 'forwrd_kl' (did you mean 'forward_kl'?)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator


class RegistryError(KeyError):
    """Unknown or duplicate name.  ``str(err)`` is a one-line, user-facing message."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REG.register("name")`` (defaults to the object's ``__name__``)."""

        def deco(obj: Any) -> Any:
            key = name or getattr(obj, "name", None) or obj.__name__
            if key in self._items and self._items[key] is not obj and not override:
                raise RegistryError(f"{self.kind} '{key}' is already registered "
                                    f"(by {getattr(self._items[key], '__module__', '?')}); "
                                    "pass override=True to replace it")
            self._items[key] = obj
            try:
                obj.registry_name = key
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def add(self, name: str, obj: Any, *, override: bool = False) -> Any:
        return self.register(name, override=override)(obj)

    def get(self, name: str) -> Any:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none registered"
            raise RegistryError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                                f"known: {known}")
        return self._items[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self):
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


_REGISTRIES: dict[str, Registry] = {}


def registry(kind: str) -> Registry:
    """The process-wide registry for ``kind`` (created on first use)."""
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def all_registries() -> dict[str, Registry]:
    return dict(_REGISTRIES)
