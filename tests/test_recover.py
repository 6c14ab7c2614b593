"""Recovery: distillation lowers the gap to the dense teacher; a killed run resumes exactly."""

import pytest
import torch

import recast
from recast.refactor.moe import moe_layers
from tiny_models import save_checkpoint, tiny_model, tiny_tokenizer


def kl_to(dense, moe, ids):
    with torch.no_grad():
        p = torch.log_softmax(dense(ids).logits, -1)
        q = torch.log_softmax(moe(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def refactored(tokenizer, **recover):
    return recast.refactor(
        tiny_model("llama"),
        tokenizer=tokenizer,
        calibration="builtin:pydoc/statements",
        experts=4,
        top_k=1,
        shared=0.25,
        strategy="importance",
        router="layer",
        router_options={"steps": 20},
        recover=recover or None,
        samples=16,
        seq_len=32,
        progress=False,
    )


def training_ids(tokenizer):
    """The sequences recovery trains on (what `refactored` calibrates with, same seed)."""
    from recast.data import load_documents, split_documents, token_sequences

    docs = split_documents(load_documents("builtin:pydoc/statements"), "calibration")
    return torch.tensor(
        token_sequences(tokenizer, docs, samples=16, seq_len=32, mode="stream", seed=0)
    )


def test_distillation_minimises_the_kl_to_the_teacher(tokenizer):
    # A random tiny model has nothing to generalise, so this checks the objective on the
    # training text; held-out gains on a trained model are measured by bench_quality.
    dense = tiny_model("llama")
    ids = training_ids(tokenizer)
    before = kl_to(dense, refactored(tokenizer), ids)
    after = kl_to(dense, refactored(tokenizer, steps=40, rounds=1, lr=1e-2), ids)
    assert after < 0.5 * before


def test_lora_recovery_merges_into_the_experts(tokenizer):
    moe = refactored(tokenizer, steps=10, rounds=1, lr=3e-3, lora={"rank": 4})
    assert all(type(m.experts).__name__ == "ExpertBank" for m in moe_layers(moe))
    assert not any("lora" in name for name, _ in moe.named_parameters())
    plain = refactored(tokenizer)
    changed = [
        not torch.equal(a.experts.up, b.experts.up)
        for a, b in zip(moe_layers(moe), moe_layers(plain), strict=True)
    ]
    assert all(changed)
    for layer in moe_layers(moe):  # padded neurons stay exactly zero
        assert torch.all(layer.experts.up[layer.experts.mask == 0] == 0)


def test_lora_is_the_default_only_above_a_size(monkeypatch):
    from recast import recover as recovery

    model = tiny_model("llama")
    assert recovery.lora_rank(recovery.LoraSpec(), model) == 0  # small: the full weights
    assert recovery.lora_rank(recovery.LoraSpec(rank=4), model) == 4
    monkeypatch.setattr(
        recovery, "LORA_ABOVE_PARAMS", sum(p.numel() for p in model.parameters()) - 1
    )
    assert recovery.lora_rank(recovery.LoraSpec(), model) == recovery.AUTO_LORA_RANK
    assert recovery.lora_rank(recovery.LoraSpec(rank=0), model) == 0  # asked for: kept


def recipe_for(checkpoint, **recover):
    return {
        "name": "resume",
        "model": str(checkpoint),
        "calibration": {"data": "builtin:pydoc/statements", "samples": 12, "seq_len": 24},
        "experts": {"count": 4, "top_k": 1, "shared": 0.25, "strategy": "importance"},
        "router": {"kind": "layer", "steps": 10},
        "recover": {"steps": 6, "rounds": 3, "lr": 3e-3, **recover},
        "evaluate": {"samples": 4},
    }


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")
    recipe = recipe_for(checkpoint)
    straight = recast.convert(recipe, out=tmp_path / "straight", progress=False)

    def die_after_first_round(index):
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        recast.convert(
            recipe, out=tmp_path / "resumed", progress=False, on_round_end=die_after_first_round
        )
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / ".resumed.recover" / "round-0.safetensors").exists()
    resumed = recast.convert(recipe, out=tmp_path / "resumed", progress=False, resume=True)
    assert resumed.report.recovery["resumed_after"] == 1
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(
            resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name
        )
    assert not (tmp_path / ".resumed.recover").exists()  # removed once the output is written


def test_resume_refuses_another_recipes_checkpoint(tmp_path):
    checkpoint = save_checkpoint("llama", tmp_path / "dense")

    def die(index):
        raise Killed

    with pytest.raises(Killed):
        recast.convert(recipe_for(checkpoint), out=tmp_path / "o", progress=False, on_round_end=die)
    with pytest.raises(recast.RecastError, match="different recipe"):
        recast.convert(
            recipe_for(checkpoint, lr=1e-2), out=tmp_path / "o", progress=False, resume=True
        )


@pytest.mark.parametrize(
    ("strategy", "router", "router_steps"),
    [("uniform", "oracle", 0), ("importance", "layer", 0)],
)
def test_recovery_runs_without_calibration_or_router_training(
    tokenizer, strategy, router, router_steps
):
    # Recovery alone still needs training text; a router that is not trained gets no rounds.
    moe = recast.refactor(
        tiny_model("llama"),
        tokenizer=tokenizer,
        calibration="builtin:pydoc/statements",
        experts=4,
        top_k=1,
        strategy=strategy,
        router=router,
        router_options={"steps": router_steps} if router == "layer" else None,
        recover={"steps": 2, "rounds": 2},
        samples=4,
        seq_len=16,
        progress=False,
    )
    assert len(moe_layers(moe)) == 2
