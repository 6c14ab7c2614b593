"""The documentation and the example recipes stay true to the code.

Every recipe key (and every strategy and router kind option) has a row in docs/recipes.md, and
every router kind and output format is described there; every recipe in
recipes/ validates and says how to run it, the README's Python examples run, its quick start is
exactly `make demo` + `make test`, and every `recast ...` invocation in the docs names a command
and flags the CLI has.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections import Counter
from pathlib import Path

import pytest
from pydantic import BaseModel

from recast import load_recipe
from recast.cli import _parser
from recast.data import BUILTIN_SOURCES
from recast.formats import FORMATS
from recast.fusion import load_fusion_recipe
from recast.fusion.recipe import FusedModel, FusionRecipe
from recast.recipe import Recipe
from recast.refactor.partition import STRATEGIES
from recast.routers import ROUTERS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES_DOC = ROOT / "docs" / "recipes.md"
RECIPE_FILES = sorted((ROOT / "recipes").glob("*.yaml"))
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SHELL_LANGUAGES = ("sh", "bash", "shell", "console", "")


# --- helpers -------------------------------------------------------------------------------


def _nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (`Spec`, `Spec | None`,
    `dict[str, str | Spec]`: a mapping's values), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return _nested_model(typing.get_args(annotation)[1])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def schema_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Dotted paths of every field of `model` and of the models nested in it."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        nested = _nested_model(field.annotation)
        if nested is not None:
            keys.extend(schema_keys(nested, f"{path}."))
    return keys


def registry_option_keys(registry, prefix: str, schema) -> list[str]:
    """`<prefix><key>` for each option of each registered component; `schema(component)` is
    the component's options model. Router kinds' options are extra keys of the `router`
    section (e.g. `router.width` for `pregate`); strategies' live under `experts.options`."""
    keys = {
        f"{prefix}{key}"
        for name in registry.names()
        for key in schema(registry.get(name)).model_fields
    }
    return sorted(keys)


def all_recipe_keys() -> list[str]:
    return [
        *schema_keys(),
        *registry_option_keys(STRATEGIES, "experts.options.", lambda strategy: strategy.options),
        *registry_option_keys(ROUTERS, "router.", lambda router: router.Options),
    ]


def output_formats() -> list[str]:
    """The values `output.format` accepts (the registered formats)."""
    return FORMATS.names()


def documented_rows(text: str) -> Counter:
    """How often each `` `x` `` is the first cell of a Markdown table row."""
    rows = Counter()
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        first = line.strip().strip("|").split("|")[0].strip()
        match = re.fullmatch(r"`([^`]+)`", first)
        if match:
            rows[match[1]] += 1
    return rows


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(m[1], m[2]) for m in FENCE.finditer(text)]


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match[1]


def readme_python_blocks() -> list[str]:
    return [body for lang, body in code_blocks(README.read_text()) if lang == "python"]


def cli_invocations() -> list[tuple[str, str]]:
    """(where, command line) of every `recast ...` invocation in the docs and recipe comments."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for lang, body in code_blocks(text):
            if lang not in SHELL_LANGUAGES:
                continue
            for line in body.splitlines():
                words = line.strip().removeprefix("$ ").split()
                is_recast = words and (words[0] == "recast" or words[0].endswith("bin/recast"))
                if is_recast and len(words) > 1:
                    found.append((path.name, " ".join(["recast", *words[1:]])))
        prose = FENCE.sub("", text)
        found += [
            (path.name, span) for span in INLINE_CODE.findall(prose) if span.startswith("recast ")
        ]
    for path in RECIPE_FILES:
        first = path.read_text().splitlines()[0]
        found.append((path.name, first.removeprefix("#").strip()))
    return found


def cli_commands() -> tuple[set[str], dict[str, argparse.ArgumentParser]]:
    """The top-level option strings and the subcommand parsers of `recast`."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = {s for a in parser._actions for s in a.option_strings}
    return top, dict(sub.choices)


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


# --- (a) every recipe key is documented -----------------------------------------------------


def test_fusion_recipe_key_walk():
    assert schema_keys(FusionRecipe) == [
        "name",
        "models",
        "models.source",
        "models.outputs",
        "shared_inputs",
        "target",
        "skip",
        "dir",
    ]
    assert set(FusedModel.model_fields) == {"source", "outputs"}


def test_every_fusion_recipe_key_has_a_row_in_docs_fusion():
    fusion_doc = ROOT / "docs" / "fusion.md"
    assert fusion_doc.is_file(), "docs/fusion.md is missing"
    rows = documented_rows(fusion_doc.read_text())
    keys = schema_keys(FusionRecipe)
    missing = [key for key in keys if rows[key] == 0]
    assert not missing, "docs/fusion.md has no table row starting with `key` for: " + ", ".join(
        missing
    )
    repeated = [key for key in keys if rows[key] > 1]
    assert not repeated, "docs/fusion.md documents these keys more than once: " + ", ".join(
        repeated
    )


def test_schema_walk_finds_nested_keys():
    keys = all_recipe_keys()
    assert {"name", "model", "seed", "calibration.samples", "experts.options"} <= set(keys)
    assert "experts.options.features" in keys  # a strategy option
    assert {"recover.lora.rank", "recover.distill.kl_weight"} <= set(keys)  # nested sections
    assert {"router.width", "router.hidden"} <= set(keys)  # router kind options


def test_router_options_do_not_shadow_router_settings():
    """A kind's option named like a common `router` setting could not be told apart from it."""
    common = set(Recipe.model_fields["router"].annotation.model_fields)
    clashes = [
        f"{name}.{key}"
        for name in ROUTERS.names()
        for key in ROUTERS.get(name).Options.model_fields
        if key in common
    ]
    assert not clashes, "router kind options clash with router settings: " + ", ".join(clashes)


def test_every_recipe_key_has_a_row_in_docs_recipes():
    rows = documented_rows(RECIPES_DOC.read_text())
    missing = [key for key in all_recipe_keys() if rows[key] == 0]
    assert not missing, "docs/recipes.md has no table row starting with `key` for: " + ", ".join(
        missing
    )


def test_every_recipe_key_is_documented_once():
    rows = documented_rows(RECIPES_DOC.read_text())
    repeated = [key for key in all_recipe_keys() if rows[key] > 1]
    assert not repeated, "docs/recipes.md documents these keys more than once: " + ", ".join(
        repeated
    )


def test_docs_recipes_documents_no_unknown_keys():
    """A row for a key the schema does not have (renamed or removed) is stale."""
    known = set(all_recipe_keys())
    top = set(Recipe.model_fields)
    stale = [
        key
        for key in documented_rows(RECIPES_DOC.read_text())
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key)
        and key.split(".")[0] in top
        and key not in known
    ]
    assert not stale, "docs/recipes.md documents keys the recipe schema lacks: " + ", ".join(stale)


def test_every_router_kind_and_output_format_is_described():
    """Each router kind has a row in the router kinds table; each output format is named."""
    text = RECIPES_DOC.read_text()
    rows = documented_rows(text)
    missing = [f"router kind {name}" for name in ROUTERS.names() if rows[name] == 0]
    missing += [f"output.format {fmt}" for fmt in output_formats() if f"`{fmt}`" not in text]
    assert not missing, "docs/recipes.md does not describe: " + ", ".join(missing)


def test_every_builtin_text_source_is_listed():
    rows = documented_rows(RECIPES_DOC.read_text())
    missing = [source for source in BUILTIN_SOURCES if rows[source] == 0]
    assert not missing, "docs/recipes.md does not list the built-in sources: " + ", ".join(missing)


# --- (b) recipes validate and say how to run them ------------------------------------------


REQUIRED_RECIPES = [
    "quickstart",
    "llama-tiny",
    "mistral",
    "qwen2",
    "gpt2",
    "bert-minilm",
    *(f"strategy-{name}" for name in STRATEGIES.names()),
]


@pytest.mark.parametrize("name", REQUIRED_RECIPES)
def test_required_recipe_exists(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    assert path.exists(), f"recipes/{name}.yaml is missing"
    if name.startswith("strategy-"):
        strategy = name.removeprefix("strategy-")
        assert load_recipe(path).experts.strategy == strategy


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_validates_and_starts_with_its_command(path):
    """Conversion recipes run with `recast convert`; fusion recipes (`fuse-*`) with `recast fuse`."""
    command = "fuse" if path.name.startswith("fuse-") else "convert"
    lines = path.read_text().splitlines()
    assert lines and lines[0] == f"# recast {command} recipes/{path.name}", (
        f"{path.name} must start with '# recast {command} recipes/{path.name}'"
    )
    assert len(lines) > 1 and lines[1].startswith("# "), (
        f"{path.name}: the command line must be followed by a comment saying what it does"
    )
    if command == "fuse":
        load_fusion_recipe(path)
    else:
        load_recipe(path)


# --- (c) README Python examples run --------------------------------------------------------


def test_readme_has_python_examples():
    assert readme_python_blocks(), "README.md has no ```python example"


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(readme_python_blocks()[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": "__readme__"})


# --- (d) the quick start is exactly two commands -------------------------------------------


def test_readme_quick_start_is_make_demo_and_make_test():
    blocks = code_blocks(section(README.read_text(), "Quick start"))
    assert len(blocks) == 1, "the Quick start section must have exactly one code block"
    lang, body = blocks[0]
    assert lang == "sh"
    assert [line.strip() for line in body.splitlines() if line.strip()] == [
        "make demo",
        "make test",
    ]


# --- (e) documented commands exist ---------------------------------------------------------


def test_documented_recast_commands_and_flags_exist():
    top, commands = cli_commands()
    invocations = cli_invocations()
    assert invocations, "no `recast ...` invocation found in the docs"
    problems = []
    for where, line in invocations:
        words = line.split()[1:]
        while words and words[0] in top:  # global options before the command
            words.pop(0)
        if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
            continue  # a placeholder such as COMMAND
        command, rest = words[0], words[1:]
        if command not in commands:
            problems.append(f"{where}: `{line}`: no command {command!r}")
            continue
        allowed = top | options_of(commands[command])
        for word in rest:
            flag = word.strip("[]()`.,;:").split("=")[0]
            if flag.startswith("-") and flag not in allowed and flag not in ("-", "--"):
                problems.append(f"{where}: `{line}`: {command} has no option {flag}")
    assert not problems, "\n".join(problems)


def test_every_cli_command_and_flag_is_in_docs_recipes():
    text = RECIPES_DOC.read_text()
    top, commands = cli_commands()
    missing = [f"recast {name}" for name in commands if f"`recast {name}" not in text]
    for name, parser in [("recast", None), *commands.items()]:
        flags = top if parser is None else options_of(parser)
        missing += [
            f"{name} {flag}"
            for flag in flags
            if flag.startswith("--") and flag != "--help" and f"`{flag}" not in text
        ]
    assert not missing, "docs/recipes.md does not document: " + ", ".join(missing)
