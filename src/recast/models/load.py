"""Load dense checkpoints: local HF directories (safetensors, sharded), Python packages that ship
a model directory, or hub ids when online. Pickle checkpoints are refused unless trusted.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from ..errors import ModelLoadError, PickleCheckpointError
from ..logs import quiet
from .families import Family, family_for
from .surgery import dense_ffn, layer_modules

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclass
class DenseModel:
    """A loaded dense model with its family adapter and tokenizer."""

    model: nn.Module
    family: Family
    tokenizer: transformers.PreTrainedTokenizerBase | None
    source: str

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"DenseModel({self.family.name}, {params:,} params, from {self.source!r})"


def resolve_source(spec: str) -> str:
    """A local directory for `spec`: a path, `package:<module>` (a pip-installed model), or a
    hub id: its cached snapshot, else the id itself once the Hub is known to have it."""
    if spec.startswith("package:"):
        return str(_package_model_dir(spec.removeprefix("package:")))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model {spec!r} is a file; point model at the checkpoint directory")
    # `owner/name` is a hub id, unless `owner` is a local directory (e.g. exported/tiny-lm).
    looks_like_path = (
        spec.startswith((".", "/", "~")) or spec.count("/") != 1 or path.parent.is_dir()
    )
    if looks_like_path:
        raise ModelLoadError(
            f"model path {spec!r} does not exist; check recipe key 'model' (or build it first)"
        )
    return _hub_checkpoint(spec)


def _hub_checkpoint(repo_id: str) -> str:
    """The cached snapshot of a hub model with weights, else the id for transformers to
    download; fails at once when the Hub is off or unreachable (transformers would retry
    for half a minute first)."""
    import huggingface_hub

    for name in (*SAFE_WEIGHTS, *PICKLE_WEIGHTS):
        cached = huggingface_hub.try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):  # (not the marker of a file known to be absent)
            return str(Path(cached).parent)
    missing = f"model {repo_id!r} is not a local directory, nor in the Hugging Face cache"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{missing}, and HF_HUB_OFFLINE is set; download it while online or give a path"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=10)  # one request, no retries
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ModelLoadError(f"{missing}, nor on the Hub; check recipe key 'model'") from None
    except Exception as exc:  # the Hub client's transport errors are not part of its API
        raise ModelLoadError(
            f"{missing}, and the Hub cannot be reached ({_first_line(exc)}); connect, or give "
            f"a local path"
        ) from exc
    return repo_id


def _package_model_dir(module_name: str) -> Path:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model package {module_name!r} is not installed; pip install "
            f"{module_name.replace('_', '-')}"
        ) from exc
    getter = getattr(module, "get_model_path", None)
    directory = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    if not (directory / "config.json").exists():
        raise ModelLoadError(f"package {module_name!r} ships no model directory at {directory}")
    return directory


def check_weight_files(directory: Path, trust_pickle: bool) -> None:
    """Refuse a directory with no weights, or with only pickle weights unless trusted."""
    if any((directory / name).exists() for name in SAFE_WEIGHTS):
        return
    pickles = [name for name in PICKLE_WEIGHTS if (directory / name).exists()]
    if pickles and not trust_pickle:
        raise PickleCheckpointError(
            f"{directory / pickles[0]} is a pickle checkpoint, which can run code when loaded; "
            f"convert it to safetensors or pass --trust-pickle (loads with weights_only=True)"
        )
    if not pickles:
        raise ModelLoadError(f"{directory} has no model weights (expected {SAFE_WEIGHTS[0]})")


def load_dense(
    spec: str, *, trust_pickle: bool = False, dtype: torch.dtype = torch.float32
) -> DenseModel:
    """Load a dense checkpoint of a supported family, validated against its adapter."""
    source, config = read_config(spec)
    family = family_for(config.model_type)
    model = load_pretrained(
        spec, source, config, causal_lm=family.causal_lm, trust_pickle=trust_pickle, dtype=dtype
    )
    validate_layout(model, family)
    return DenseModel(model, family, tokenizer_for(source), spec)


def read_config(spec: str) -> tuple[str, transformers.PretrainedConfig]:
    """(local directory or hub id, config) of a checkpoint."""
    source = resolve_source(spec)
    try:
        return source, transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {spec!r}: {_first_line(exc)}") from exc


def load_pretrained(
    spec: str,
    source: str,
    config: transformers.PretrainedConfig,
    *,
    causal_lm: bool = True,
    trust_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The transformers model of `config` with every tensor read from the checkpoint: none
    missing, unexpected, misshapen or non-finite; pickle files only with `trust_pickle`."""
    if Path(source).is_dir():
        check_weight_files(Path(source), trust_pickle)
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    # Mismatched shapes are reported, not raised, so that check_keys can name the tensor.
    strict = dict(dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        state = read_safetensors(Path(source)) if Path(source).is_dir() else None
        # Its load report is many lines, check_keys says what matters in one. (Silencing
        # transformers.modeling_utils alone would make it log the tensor-parallel plan.)
        with quiet("transformers"):
            if state is not None:
                model_cls = (MODEL_FOR_CAUSAL_LM_MAPPING if causal_lm else MODEL_MAPPING)[
                    type(config)
                ]
                model, info = model_cls.from_pretrained(
                    None, config=config, state_dict=state, **strict
                )
            else:
                model, info = auto.from_pretrained(source, weights_only=True, **strict)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt files surface as many types (SafetensorError, EOFError...)
        raise ModelLoadError(f"cannot load the weights of {spec!r}: {_first_line(exc)}") from exc
    check_keys(info, spec)
    if (name := non_finite(model)) is not None:
        raise ModelLoadError(
            f"tensor {name} of {spec!r} holds NaN or inf; fix or re-export the checkpoint"
        )
    return model.eval()


def read_safetensors(directory: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors read into ordinary memory (None: not a safetensors directory).

    transformers would map the files instead; mapped weights keep the whole file resident for
    as long as any tensor of it lives, so the dense FFNs that conversion drops one layer at a
    time would stay in memory beside the experts built from them.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        return None
    state = {}
    for name in files:
        try:  # safetensors' own errors for these are misleading ("No such device")
            (directory / name).open("rb").close()
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read {directory / name} ({exc.strerror}); it must be a readable "
                f"safetensors file"
            ) from exc
        with safetensors.safe_open(str(directory / name), framework="pt", backend="pread") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    return state


def check_keys(info: dict, spec: str) -> None:
    """Refuse tensors of the wrong shape, missing (transformers would initialise them randomly)
    or unexpected (weights of another architecture); tied weights are not counted missing."""
    if info["mismatched_keys"]:
        key, found, expected = min(info["mismatched_keys"])
        raise ModelLoadError(
            f"tensor {key} of {spec!r} has shape {list(found)} but the model's config expects "
            f"{list(expected)}; the weights and config.json do not match"
        )
    for field, problem in (("missing_keys", "lacks"), ("unexpected_keys", "has an unknown")):
        keys = sorted(info[field])
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelLoadError(
                f"{spec!r} {problem} tensor {keys[0]}{more}; the checkpoint is incomplete or "
                f"not of the architecture its config.json names"
            )


def non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf (None: all finite)."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def validate_layout(model: nn.Module, family: Family) -> None:
    """Every layer has the adapter's FFN with consistent shapes (raises before any change)."""
    for i, layer in enumerate(layer_modules(model, family)):
        dense_ffn(layer, family, i)


def tokenizer_for(source: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None  # weights without a tokenizer are still convertible from token ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
