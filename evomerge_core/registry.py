"""One small generic registry: named entries of one kind (merge methods, scorers, VLM families,
run kinds), a decorator to add one, and a lookup whose error names the close match and the
known names.

```python
METHODS: Registry[MergeMethod] = Registry("merge method", error=MergeError)
METHODS.add("linear", MergeMethod(...))
METHODS.get("linaer")  # MergeError: unknown merge method 'linaer'; did you mean 'linear'? known: ...
```
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from evomerge_core.errors import EvomergeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. Adding a name twice is a programming error (ValueError);
    looking up an unknown name is the user's (`error`, an EvomergeError subclass)."""

    def __init__(self, what: str, *, error: type[EvomergeError] = EvomergeError, hint: str = "") -> None:
        self.what = what
        self.error = error
        self.hint = hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` as `name`; returns it."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: `@REGISTRY.register("name")`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, *, what: str | None = None) -> T:
        """The entry `name`; an unknown name raises `error` naming the close match and the known names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(self.unknown_message(name, what=what)) from None

    def close_match(self, name: object) -> str | None:
        """The registered name closest to `name`, or None when none is close."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        return close[0] if close else None

    def unknown_message(self, name: object, *, what: str | None = None) -> str:
        close = self.close_match(name)
        suggestion = f"; did you mean {close!r}?" if close else ""
        known = ", ".join(sorted(self._entries))
        hint = f" {self.hint}" if self.hint else ""
        return f"unknown {what or self.what} {name!r}{suggestion} known: {known}.{hint}"

    def remove(self, name: str) -> None:
        """Unregister `name` (tests and plugins that register temporarily)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __delitem__(self, name: str) -> None:
        self.remove(name)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
