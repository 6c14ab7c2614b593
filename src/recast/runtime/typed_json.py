"""JSON values checked against Python type hints, strictly: what the manifest's schema is
written in, so that checking a manifest needs no validation library.

- `int`, `float` (an int passes), `str`, `bool`: never a bool for a number, nor a string for
  one, nor a float for an int;
- `list[X]`, `dict[K, V]` (keys checked as K), bare `list` / `dict` (any items);
- `Literal[...]`, unions (`X | None` lets null through);
- TypedDict records: every key required but those typed `NotRequired[X]` (absent passes, null
  only if X allows it); keys a record does not declare are left alone;
- `Annotated[X, check, ...]`: once the value is an X, each check (a function that raises
  ValueError) runs on it.

`conform` raises `Mismatch` for the first value that does not fit, named by its path and in
pydantic's words, e.g. `model.cache: Input should be a valid dictionary`.
"""

from __future__ import annotations

import functools
import re
import types
from typing import (
    Annotated,
    Literal,
    NotRequired,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

# what a value of each plain kind is called when another is found
EXPECTED = {
    int: "a valid integer",
    float: "a valid number",
    str: "a valid string",
    bool: "a valid boolean",
    list: "a valid list",
    dict: "a valid dictionary",
}


class Mismatch(ValueError):
    """A value that does not fit its type; `wrong_type` when it is not even of the kind asked
    (a string for a list), rather than one of that kind that fails a check."""

    def __init__(self, message: str, path: tuple = (), wrong_type: bool = False):
        super().__init__(message)
        self.message, self.path, self.wrong_type = message, path, wrong_type

    def __str__(self) -> str:
        where = ".".join(map(str, self.path))
        return f"{where}: {self.message}" if where else self.message


def at_least(least: int):
    def check(value) -> None:
        if value < least:
            raise ValueError(f"Input should be greater than or equal to {least}")

    return check


def matches(pattern: str):
    """The whole string matches `pattern`."""
    compiled = re.compile(pattern)

    def check(value: str) -> None:
        if compiled.fullmatch(value) is None:
            raise ValueError(f"String should match pattern '{pattern}'")

    return check


def length(least: int, most: int | None = None):
    """A list's or dictionary's item count within [least, most]."""

    def check(value) -> None:
        kind = "List" if isinstance(value, list) else "Dictionary"
        if len(value) < least:
            raise ValueError(f"{kind} should have at least {_items(least)}, not {len(value)}")
        if most is not None and len(value) > most:
            raise ValueError(f"{kind} should have at most {_items(most)}, not {len(value)}")

    return check


def _items(count: int) -> str:
    return f"{count} item{'s' * (count != 1)}"


def conform(value, hint, path: tuple = ()) -> None:
    """Raise `Mismatch` unless the JSON `value` fits the type `hint`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        conform(value, args[0], path)
        for check in hint.__metadata__:
            try:
                check(value)
            except ValueError as exc:
                raise Mismatch(str(exc), path) from None
    elif origin in (Union, types.UnionType):
        _one_of(value, args, path)
    elif origin is Literal:
        if not any(type(value) is type(choice) and value == choice for choice in args):
            *others, last = [repr(choice) for choice in args]
            either = f"{', '.join(others)} or {last}" if others else last
            raise Mismatch(f"Input should be {either}", path, wrong_type=True)
    elif is_typeddict(hint):
        _record(value, hint, path)
    elif hint is type(None):
        if value is not None:
            raise Mismatch("Input should be None", path, wrong_type=True)
    else:
        kind = origin or hint
        if not _is_a(value, kind):
            raise Mismatch(f"Input should be {EXPECTED[kind]}", path, wrong_type=True)
        if kind is list and args:
            for i, item in enumerate(value):
                conform(item, args[0], (*path, i))
        elif kind is dict and args:
            for key, item in value.items():
                conform(key, args[0], (*path, key, "[key]"))
                conform(item, args[1], (*path, key))


def _is_a(value, kind: type) -> bool:
    if kind not in EXPECTED:
        raise TypeError(f"typed_json cannot check {kind!r}")  # a schema that needs more
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _one_of(value, members: tuple, path: tuple) -> None:
    mismatches = []
    for member in members:
        try:
            conform(value, member, path)
            return
        except Mismatch as exc:
            mismatches.append(exc)
    # a member whose kind the value has tells most (a list of the wrong length, not "a string")
    fitted = [m for m in mismatches if m.path != path or not m.wrong_type]
    raise (fitted or mismatches)[0]


def _record(value, record: type, path: tuple) -> None:
    if not isinstance(value, dict):
        raise Mismatch("Input should be a valid dictionary", path, wrong_type=True)
    for key, (hint, required) in _fields(record).items():
        if key in value:
            conform(value[key], hint, (*path, key))
        elif required:
            raise Mismatch("Field required", (*path, key))


@functools.cache
def _fields(record: type) -> dict[str, tuple[object, bool]]:
    """{key: (type, required)} of a TypedDict record."""
    fields = {}
    for key, hint in get_type_hints(record, include_extras=True).items():
        optional = get_origin(hint) is NotRequired
        fields[key] = (get_args(hint)[0] if optional else hint, not optional)
    return fields
