"""Export recast and dense models to bundles a runtime loads (`recast export`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..atomic import check_output
from .bundle import export_bundle
from .settings import ExportSpec, export_spec

__all__ = ["ExportSpec", "export", "export_bundle"]


def export(
    model: nn.Module | str | Path,
    out: str | Path,
    spec: ExportSpec | dict | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Export a model object, a recast output directory or a dense checkpoint (a directory,
    `package:<module>` or a hub id) to a parity-checked bundle at `out`."""
    spec = export_spec(spec)
    recipe_yaml, source, inputs = None, "<in-memory>", ()
    if not isinstance(model, nn.Module):
        source = str(model)
        inputs = (Path(source).expanduser(),)
        check_output(Path(out), overwrite, inputs)  # before loading the model
        model, tokenizer, recipe_yaml = load_for_export(source, trust_pickle)
    return export_bundle(
        model,
        out,
        spec,
        tokenizer=tokenizer,
        recipe_yaml=recipe_yaml,
        source=source,
        overwrite=overwrite,
        inputs=inputs,
    )


def load_for_export(source: str, trust_pickle: bool = False):
    """(model, tokenizer, recipe YAML or None) from a recast output or a dense checkpoint."""
    from ..formats.recast import MODEL_TYPE, load
    from ..models.load import load_dense, resolve_source, tokenizer_for

    path = Path(resolve_source(source))
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE:
        recipe = path / "recipe.yaml"
        return (
            load(path),
            tokenizer_for(str(path)),
            recipe.read_text() if recipe.is_file() else None,
        )
    dense = load_dense(source, trust_pickle=trust_pickle)
    return dense.model, dense.tokenizer, None
