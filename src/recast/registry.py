"""Small name -> component registries (peft `register_peft_method` style).

A registry refuses duplicate names and answers an unknown name with the closest known one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import RecipeError

T = TypeVar("T")


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' when a known name is close to `name`, else ''."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            known = sorted(self._items)
            raise RecipeError(
                f"unknown {self.what} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
