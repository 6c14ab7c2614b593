"""The base of every settings section (the recipe's sections, the fusion recipe, export
settings): strict pydantic models, the checks of a registered component's name and options,
and reading a YAML mapping into a section with one-line errors that name the key and line."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError
from .registry import Registry, did_you_mean


def registered(registry: Registry, name: str) -> str:
    """`name` if the registry knows it; a ValueError (so pydantic adds the field path) if not."""
    try:
        registry.get(name)
    except RecipeError as exc:
        raise ValueError(str(exc)) from None
    return name


def check_options(
    schema: type[BaseModel], options: dict, owner: str, prefix: str = "", also_known: list[str] = ()
) -> BaseModel:
    """A component's `options` validated by its schema (defaults filled in); a ValueError
    (which pydantic places under the field path) names the key and suggests the closest one."""
    # Option schemas are the components' own models: refuse non-finite numbers as Section does.
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{key}: Input should be a finite number for {owner}")
    try:
        return schema(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        unknown = first["type"] == "extra_forbidden"
        hint = did_you_mean(key, [*also_known, *schema.model_fields]) if unknown else ""
        message = "unknown key" if unknown else first["msg"].removeprefix("Value error, ")
        where = f"{prefix}{key}: " if key else ""
        raise ValueError(
            f"{where}{message}{hint} for {owner} "
            f"(its options: {', '.join(schema.model_fields) or 'none'})"
        ) from None


class Section(BaseModel):
    # inf passes open ranges (lr > 0) and nan fails ranges with a misleading message
    # ("should be less than 1"): refuse both as not finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def read_mapping(source: str | Path | dict, keys: str) -> tuple[dict, str, str | None]:
    """(data, origin, YAML text) of a recipe given as a dict or a YAML file; `keys` names
    some top-level keys for the error a non-mapping gets."""
    if isinstance(source, dict):
        return copy.deepcopy(source), "recipe", None  # overrides must not change the caller's
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys such as {keys}")
    return data, str(path), text


def validated(schema: type[BaseModel], data: dict, origin: str, text: str | None):
    """`schema` validated from `data`; RecipeError with the first error's path and line."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, origin, text, schema)) from None


def _describe(exc: ValidationError, origin: str, text: str | None, schema: type[BaseModel]) -> str:
    """One line for the first error: `file:line: path: message`, and how many more."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    path = "".join(f"{p}: " for p in [".".join(loc)] if p)
    line = _line_of(text, first["loc"]) if text else None
    where = f"{origin}:{line}" if line else origin
    if first["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1], schema)
        message = f"unknown key{did_you_mean(loc[-1], known)}; allowed here: {', '.join(known)}"
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {path}{message}{more}"


def _known_keys(parents: list[str], model: type[BaseModel]) -> list[str]:
    for part in parents:
        if part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based YAML line of the key at `loc` (or of its deepest existing parent)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next((kv for kv in node.value if kv[0].value == str(part)), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
