"""Stock MoE formats: written models load with plain transformers and match recast's model."""

import json
import os
import subprocess
import sys

import pytest

import recast
from recast.errors import RecastError, RecipeError
from tiny_models import save_checkpoint


def stock_recipe(checkpoint, fmt, **overrides):
    recipe = {
        "name": f"stock-{fmt}",
        "model": str(checkpoint),
        "calibration": {"data": "builtin:pydoc/statements", "samples": 8, "seq_len": 24},
        "experts": {
            "count": 4,
            "top_k": 2,
            "shared": 0.25 if fmt == "qwen2_moe" else 0.0,
            "strategy": "cluster",
            "combine": "softmax",
        },
        "router": {"kind": "layer", "steps": 10},
        "recover": {"steps": 3, "rounds": 2, "lr": 1e-3},
        "evaluate": {"samples": 4},
        "output": {"format": fmt},
    }
    recipe.update(overrides)
    return recipe


LOAD_WITHOUT_RECAST = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[5, 9, 17, 33, 64, 100, 7]])
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__name__, "recast_imported": "recast" in sys.modules,
                  "logits": logits[0, -1, :8].tolist()}))
"""


@pytest.mark.parametrize(
    ("family", "fmt"), [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("llama", "qwen2_moe")]
)
def test_stock_output_loads_with_plain_transformers_and_matches(family, fmt, tmp_path):
    import torch

    checkpoint = save_checkpoint(family, tmp_path / "dense")
    result = recast.convert(stock_recipe(checkpoint, fmt), out=tmp_path / "out", progress=False)
    check = result.report.stock_check
    assert check["max_abs_logprob_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == fmt
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stock_check"] == check
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fresh = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_RECAST, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert (
        loaded["class"]
        == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    )
    assert not loaded["recast_imported"]
    with torch.no_grad():
        ours = result.model(torch.tensor([[5, 9, 17, 33, 64, 100, 7]])).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("fmt", "change", "message"),
    [
        ("mixtral", {"router": {"kind": "pregate"}}, "cannot express router.kind 'pregate'"),
        (
            "mixtral",
            {"experts": {"count": 4, "top_k": 2, "shared": 0.25, "combine": "softmax"}},
            "no shared expert",
        ),
        (
            "qwen2_moe",
            {"experts": {"count": 4, "top_k": 2, "shared": 0.0, "combine": "softmax"}},
            "always has a shared expert",
        ),
        ("mixtral", {"experts": {"count": 4, "top_k": 2, "combine": "sum"}}, "combine: softmax"),
    ],
)
def test_what_a_format_cannot_express_is_refused(fmt, change, message):
    with pytest.raises(RecipeError, match=message):
        recast.load_recipe({**stock_recipe("m", fmt), **change})


def test_unsupported_family_for_a_stock_format(tmp_path):
    checkpoint = save_checkpoint("gpt2", tmp_path / "dense")
    with pytest.raises(RecastError, match="written from llama, mistral"):
        recast.convert(stock_recipe(checkpoint, "mixtral"), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_attention_bias_is_refused_before_any_work(tmp_path):
    import transformers

    from recast.formats import FORMATS
    from recast.models.families import family_for

    config = transformers.LlamaConfig(attention_bias=True)
    for fmt in ("mixtral", "qwen2_moe"):
        with pytest.raises(RecastError, match="attention_bias is true"):
            FORMATS.get(fmt).check_family(family_for("llama"), config)
