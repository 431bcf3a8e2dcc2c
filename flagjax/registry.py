"""One registry type for everything flagjax looks up by name: aggregation rules, pre-aggregators,
attacks and models (``flagjax.aggregators``, ``flagjax.attacks``, ``flagjax.models``).

A :class:`Registry` maps names to records; ``get`` of an unknown name raises ``KeyError`` naming the
known ones, ``register`` refuses a taken name (in this registry or in the ones it shares its
namespace with, e.g. rules and pre-aggregators, which compose as ``"nnm+krum"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> records of one kind (``kind`` is used in messages: "aggregation rule", "attack", ...).

    Args:
      kind: what the records are, singular, for messages.
      plural: its plural for messages (default ``kind + "s"``).
      shares_names_with: registries whose names this one may not reuse (and vice versa, when each
        lists the other).
    """

    def __init__(self, kind: str, *, plural: str | None = None, shares_names_with: tuple[Registry, ...] = ()):
        self.kind = kind
        self.plural = plural or kind + "s"
        self._items: dict[str, T] = {}
        self._shared = list(shares_names_with)

    def share_names_with(self, other: Registry) -> None:
        """Make ``other``'s names unavailable here (call on both for a common namespace)."""
        self._shared.append(other)

    def register(self, name: str, item: T) -> T:
        """Add ``item`` as ``name`` (a new name only) and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string; got {name!r}")
        if name in self._items or any(name in other for other in self._shared):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove ``name``; ``KeyError`` if unknown."""
        self.get(name)
        del self._items[name]

    def get(self, name: str) -> T:
        """The record called ``name``; ``KeyError`` naming the known ones otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names())
            raise KeyError(f"unknown {self.kind} name={name!r}; known {self.plural}: {known}") from None

    def names(self) -> tuple[str, ...]:
        """All names, sorted."""
        return tuple(sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
