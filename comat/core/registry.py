"""Names to implementations (benchmarks, methods, judges, worlds), one mechanism for all.

An entry is either registered in code or declared as an entry point of a group (``[project.entry-points."GROUP"]``
in a package's metadata), which is how the CLI finds the benchmark adapters and the toy world without importing
them: lower layers name what higher ones provide, as lm-evaluation-harness finds tasks and pytest its plugins.
Entry points are loaded on first lookup, so the CLI stays quick to start.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Generic, TypeVar

from comat.core.errors import ComatError

T = TypeVar("T")


def import_object(spec: str) -> object:
    """``package.module:attribute`` (or a bare module path) to the object it names."""
    module, _, attribute = spec.partition(":")
    obj: object = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A name -> object table that refuses a second, different object under a name already taken."""

    def __init__(self, kind: str, group: str | None = None, entries: dict[str, str] | None = None):
        self.kind = kind
        self.group = group
        self._lazy = dict(entries or {})  # name -> "module:attribute", imported on first lookup
        self._items: dict[str, T] = {}
        self._loaded_group = group is None

    def register(self, name: str, item: T) -> T:
        held = self._items.get(name)
        if held is not None and held is not item and _origin(held) != _origin(item):
            raise ComatError(f"{self.kind} '{name}' is registered twice ({_origin(held)} and {_origin(item)}); "
                             "rename one of them")
        self._items[name] = item
        return item

    def _load_group(self) -> None:
        if self._loaded_group:
            return
        self._loaded_group = True
        for ep in importlib.metadata.entry_points(group=self.group):
            self._lazy.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_group()
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_group()
            if name not in self._lazy:
                raise ComatError(f"unknown {self.kind} '{name}'; available: {', '.join(self.names()) or 'none'}")
            self.register(name, import_object(self._lazy[name]))  # type: ignore[arg-type]
        return self._items[name]


def _origin(item: object) -> str:
    return f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', type(item).__qualname__)}"
