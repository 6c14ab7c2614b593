"""`Session`: runs a verified bundle: `run`, `forward`, `embed`, `generate`.

Needs only numpy, onnxruntime and tokenizers (torch only for pt2 bundles). Inputs are checked
before onnxruntime sees them, so a wrong dtype or an out-of-vocabulary id is a one-line
`RuntimeInputError`, not a kernel crash.
"""

from __future__ import annotations

from pathlib import Path
from zipfile import BadZipFile

import numpy as np

from ..errors import BundleIntegrityError, RuntimeInputError
from .backends import OnnxGraph, Pt2Graph, onnxruntime_errors
from .experts import ExpertCache, ExpertStore
from .fused import FusedRunner, check_lengths, check_ranges
from .generate import Sampling, check_count, decode_loop, positions, presents_as_past
from .manifest import bundle_file, read_manifest
from .profile import expert_budget


class Session:
    """A loaded bundle. `verify` checks every file against the manifest; `threads` sets
    onnxruntime's intra-op threads. Offload bundles (`experts="offload"`, their default) keep
    at most `cache` experts in memory, or as many as `memory_budget` leaves room for (bytes,
    or a size such as "300MB", for the whole model: the resident weights are taken off it),
    evicting by `policy` (lru, lfu, belady) and reading experts ahead when `prefetch`;
    `cold` drops evicted experts from the OS page cache too (a miss then reads storage).
    `experts="resident"` keeps all of an offload bundle's experts in memory. `expect_sha256`
    pins the bundle: its manifest.json must have that sha256 (what `recast inspect` prints),
    and the manifest's checksums pin every file (with `verify`)."""

    def __init__(
        self,
        bundle: str | Path,
        device: str | None = None,
        verify: bool = True,
        threads: int | None = None,
        cache: int | None = None,
        memory_budget: int | str | None = None,
        policy: str = "lru",
        prefetch: bool = True,
        cold: bool = False,
        experts: str | None = None,
        models: list[str] | None = None,
        expect_sha256: str | None = None,
    ):
        if device not in (None, "cpu", "cuda"):
            raise RuntimeInputError(
                f"device must be 'cpu' or 'cuda' (None: cuda when present), got {device!r}"
            )
        if threads is not None:
            check_count("threads", threads, least=1)
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle, verify=verify, expect_sha256=expect_sha256)
        self.kind = self.manifest["kind"]  # "decoder" | "encoder" | "fused"
        self.model_info = self.manifest["model"]
        self.routing = self.manifest.get("routing")
        self.fused = None
        if self.kind == "fused":
            self.fused = FusedRunner(self.bundle, self.manifest, device, threads)
            self.models = self.fused.models if models is None else list(models)
            self.graphs = {"model": self._guarded(self.fused.graph, self.models)}
        elif models is not None:
            raise RuntimeInputError("models= selects models of a fused bundle (recast fuse)")
        else:
            self.graphs = {
                name: self._open(spec, device, threads)
                for name, spec in self.manifest["graphs"].items()
            }
        self.tokenizer = self._tokenizer()
        self.timings: dict = {}  # the last generate's prefill and decode seconds
        offload = (self.routing or {}).get("offload", False)
        if experts not in (None, "offload", "resident"):
            raise RuntimeInputError(f"experts must be 'offload' or 'resident', got {experts!r}")
        if experts == "offload" and not offload:
            raise RuntimeInputError(
                "experts='offload' needs an offload bundle; export it with offload: true"
            )
        if offload:
            if experts == "resident":
                cache = memory_budget = None
            self.experts = self._expert_cache(cache, memory_budget, policy, prefetch, cold)
        elif cache is not None or memory_budget is not None:
            raise RuntimeInputError(
                "cache and memory_budget are for offload bundles (export with offload: true)"
            )
        else:
            self.experts = None

    def _expert_cache(self, cache, memory_budget, policy, prefetch, cold):
        """The cache an offload bundle's experts are fed from: `cache` experts, as many as
        fit in what `memory_budget` leaves after the resident weights, or all of them."""
        store = ExpertStore(self.bundle, cold=cold, manifest=self.manifest)
        if cache is None and memory_budget is None:
            cache = len(store.layers) * self.routing["experts"]
        budget = None if memory_budget is None else expert_budget(self.manifest, memory_budget)
        return ExpertCache(store, cache, budget, policy, prefetch)

    def stats(self) -> dict:
        """Offload bundles: the expert cache's hits, misses, bytes loaded, stall time and peak
        resident expert bytes."""
        if self.experts is None:
            raise RuntimeInputError("stats() are kept for offload bundles only")
        stats = self.experts.stats
        return {**vars(stats), "hit_rate": stats.hit_rate, "capacity": self.experts.capacity}

    def _open(self, spec: dict, device: str | None, threads: int | None):
        if self.manifest["artifact"] == "pt2":
            # with --compile, the AOTInductor package runs instead of the program
            program = bundle_file(self.bundle, spec.get("compiled") or spec["file"], self.manifest)
            return self._guarded(Pt2Graph, program, spec, device)
        path = bundle_file(self.bundle, spec["file"], self.manifest)
        if spec["file"].startswith("router"):
            # small: one thread, so no second spinning thread pool competes with the
            # backbone's right after it
            return self._guarded(OnnxGraph, path, device, 1)
        offload = (self.routing or {}).get("offload", False)
        return self._guarded(OnnxGraph, path, device, threads, arena=not offload)

    def _guarded(self, opener, *args, **kwargs):
        try:
            return opener(*args, **kwargs)
        except (OSError, RuntimeError, ValueError, BadZipFile, *onnxruntime_errors()) as exc:
            # e.g. an unverified damaged file, a pt2 file that is no archive (the tuple is
            # built only once something was raised, so onnxruntime stays a lazy import)
            raise BundleIntegrityError(f"{self.bundle} cannot be loaded: {exc}") from exc

    def _tokenizer(self):
        if "tokenizer.json" not in self.manifest["files"]:
            if (self.bundle / "tokenizer.json").exists():  # it would decide every token id
                raise BundleIntegrityError(
                    f"{self.bundle / 'tokenizer.json'} is not in the manifest (added after "
                    "export?); export the bundle again"
                )
            return None
        path = bundle_file(self.bundle, "tokenizer.json", self.manifest)
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions (malformed JSON, I/O)
            raise BundleIntegrityError(
                f"{path} is not a readable tokenizer ({exc}); export the bundle again"
            ) from exc
        # tokenizer.json may carry a padding / truncation setup (MiniLM's pads to 128):
        # `encode` pads to the batch and truncates to the model's maximum itself
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    @property
    def providers(self) -> list[str]:
        return self.graphs["model"].providers

    # -- raw graphs -------------------------------------------------------------------------

    def run(
        self, feeds: dict[str, np.ndarray], graph: str = "model", models: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one graph (`model`, or `router` for pre-gating bundles) on named inputs. Fused
        bundles return every model's outputs as `model/output`, or, with `models`, only those
        models' (computing only what they need; inputs the others take may stay in `feeds`)."""
        if self.fused is not None:
            return self._run_fused(feeds, self.models if models is None else models)
        if models is not None:
            raise RuntimeInputError("models= selects models of a fused bundle (recast fuse)")
        if graph not in self.graphs:
            raise RuntimeInputError(
                f"this bundle has no {graph!r} graph; it has {list(self.graphs)}"
            )
        self._check_feeds(feeds, self.graphs[graph].inputs)
        return self.graphs[graph].run(feeds)

    def _run_fused(self, feeds: dict, models: list[str]) -> dict[str, np.ndarray]:
        graph = self._guarded(self.fused.graph, models)
        known = {i["name"] for i in self.fused.fusion["inputs"]}
        unknown = [n for n in feeds if n not in known]
        if unknown:
            raise RuntimeInputError(
                f"this fused bundle has no input {unknown[0]!r}; it takes {sorted(known)}"
            )
        feeds = {n: v for n, v in feeds.items() if n in graph.inputs}
        self._check_feeds(feeds, graph.inputs)
        check_ranges(self.fused.fusion["inputs"], feeds)
        check_lengths(self.fused.fusion, models, feeds)
        return graph.run(feeds)

    def _check_feeds(self, feeds: dict, expected: dict) -> None:
        missing = [n for n in expected if n not in feeds]
        unknown = [n for n in feeds if n not in expected]
        if missing or unknown:
            raise RuntimeInputError(
                f"inputs do not match the graph: missing {missing}, unexpected {unknown}; "
                f"it takes {list(expected)}"
            )
        for name, (dtype, shape) in expected.items():
            value = feeds[name]
            if not isinstance(value, np.ndarray) or (dtype is not None and value.dtype != dtype):
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                want = "numpy" if dtype is None else np.dtype(dtype)
                raise RuntimeInputError(f"{name} must be a {want} array, got {got}")
            if len(shape) != value.ndim:
                raise RuntimeInputError(f"{name} must have {len(shape)} dims, got {value.shape}")
        if "input_ids" in feeds and self.model_info is not None:
            self._check_ids(feeds["input_ids"], feeds.get("attention_mask"))

    def _check_ids(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        vocab, longest = self.model_info["vocab_size"], self.model_info["max_positions"]
        if not ids.size:
            raise RuntimeInputError(
                f"input_ids is empty (shape {ids.shape}); give at least one token per row"
            )
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
            raise RuntimeInputError(
                f"token id {bad} is outside the vocabulary of {vocab}; "
                "use the bundle's tokenizer (tokenizer.json)"
            )
        odd = None if mask is None else mask[(mask != 0) & (mask != 1)]
        if odd is not None and odd.size:
            raise RuntimeInputError(
                f"attention_mask holds {odd[0]}; it takes 1 for a token and 0 for padding only"
            )
        length = mask.shape[-1] if mask is not None else ids.shape[-1]
        if longest and length > longest:
            raise RuntimeInputError(
                f"sequence of {length} tokens is longer than the model's maximum of {longest}; "
                "truncate the input"
            )

    # -- model-level calls ------------------------------------------------------------------

    def route(self, input_ids: np.ndarray, cache: dict | None = None) -> dict:
        """Pre-gating bundles: every layer's experts for `input_ids`, before the backbone:
        `expert_indices`, `expert_weights` and `cache`, which routes the tokens that follow
        `input_ids` without rerunning them (pass it back with those tokens)."""
        ids = as_batch(input_ids)
        cache = cache if cache is not None else self._empty("router_cache", ids.shape[0])
        out = self.run({"input_ids": ids, **cache}, graph="router")
        return {
            "expert_indices": out["expert_indices"],
            "expert_weights": out["expert_weights"],
            "cache": presents_as_past(out),
        }

    def forward(self, input_ids, attention_mask=None) -> dict[str, np.ndarray]:
        """`logits` (decoders) or `last_hidden_state` (encoders) for a batch of token ids."""
        if self.fused is not None:
            raise RuntimeInputError("a fused bundle holds several models: call run(feeds)")
        ids = as_batch(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask
        mask = as_batch(mask, "attention_mask")
        if mask.shape != ids.shape:
            raise RuntimeInputError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "decoder":
            feeds["position_ids"] = positions(mask)[:, -ids.shape[1] :]
            feeds.update(self.empty_cache(ids.shape[0]))
        if "router" in self.graphs:
            feeds.update(self.routed_inputs(self.route(ids)))
        out = self.run(feeds)
        name = "logits" if self.kind == "decoder" else "last_hidden_state"
        return {name: out[name]}

    def routed_inputs(self, routed: dict, planned: bool = False) -> dict[str, np.ndarray]:
        """The backbone's expert inputs for a batch `route` routed: expert ids and weights and,
        for offload bundles, the weights of the experts it uses (from the expert cache, in
        execution order: layer by layer) with empty placeholders for the others. The batch's
        accesses are announced to the cache first (unless `planned` already) and its misses
        read ahead together."""
        feeds = {
            "expert_indices": routed["expert_indices"],
            "expert_weights": routed["expert_weights"],
        }
        if self.experts is None:
            return feeds
        accesses = self.expert_accesses(routed)
        if not planned:
            self.experts.plan(accesses)
        self.experts.pin(accesses)
        self.experts.prefetch(accesses)
        used = {expert for _, expert in accesses}
        empty = self.experts.store.placeholder
        for layer in self.experts.store.layers:
            for expert in range(self.routing["experts"]):
                weights = self.experts.get(layer, expert) if expert in used else empty
                feeds[f"experts.{layer}.{expert}.fc1"] = weights["fc1"]
                feeds[f"experts.{layer}.{expert}.fc2"] = weights["fc2"]
        return feeds

    def expert_accesses(self, routed: dict) -> list[tuple[int, int]]:
        """Offload bundles: the (layer, expert) loads a routed batch makes, in execution order
        (the pre-gating router's experts serve every layer)."""
        used = sorted({int(e) for e in np.unique(routed["expert_indices"])})
        return [(layer, e) for layer in self.experts.store.layers for e in used]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The backbone's `past.*` inputs for a first (prefill) call."""
        return self._empty("cache", batch)

    def _empty(self, which: str, batch: int) -> dict[str, np.ndarray]:
        cache = self.model_info[which]
        shape = (batch, cache["heads"], 0, cache["head_dim"])
        return {
            f"past.{i}.{kv}": np.zeros(shape, np.float32)
            for i in range(cache["layers"])
            for kv in ("key", "value")
        }

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask (right padded) for `texts` with the bundle tokenizer;
        every text must be a non-empty, valid UTF-8 string."""
        if self.tokenizer is None:
            raise RuntimeInputError("this bundle has no tokenizer.json; pass token ids instead")
        if not isinstance(texts, (list, tuple)) or not texts:
            raise RuntimeInputError(f"give a list of one or more texts, got {texts!r:.60}")
        for text in texts:
            _check_text(text)
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = self.model_info["max_positions"] or max(len(e.ids) for e in encodings)
        rows = [e.ids[:longest] for e in encodings]
        for text, row in zip(texts, rows, strict=True):
            if not row:
                raise RuntimeInputError(f"text {text!r:.60} has no tokens; give non-empty text")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.model_info["pad_token_id"], np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return ids, mask

    def embed(self, texts: list[str] | str) -> np.ndarray:
        """Encoders: mean-pooled, L2-normalised sentence embeddings `[N, hidden]` of a list of
        texts, or `[1, hidden]` of a single string (the sentence-transformers recipe of
        all-MiniLM-L6-v2). Texts must be non-empty strings."""
        if self.kind != "encoder":
            raise RuntimeInputError(f"embed() needs an encoder bundle; this one is {self.kind}")
        ids, mask = self.encode([texts] if isinstance(texts, str) else texts)
        hidden = self.forward(ids, mask)["last_hidden_state"]
        weights = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def generate(
        self,
        prompt,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ):
        """Continue `prompt` with the KV cache: text in, text out; token ids (a list or a
        `[B, T]` array) in, token ids out (prompt included, like transformers' generate)."""
        if self.kind != "decoder":
            raise RuntimeInputError(f"generate() needs a decoder bundle; this one is {self.kind}")
        text = isinstance(prompt, str)
        ids = self.encode([prompt])[0] if text else as_ids(prompt)
        ids = as_batch(ids[None] if ids.ndim == 1 else ids)
        self._check_ids(ids, None)  # also when max_new_tokens=0 runs nothing
        sampling = Sampling(do_sample, temperature, top_p, seed)
        out = decode_loop(self, ids, max_new_tokens, sampling, self.model_info["eos_token_ids"])
        if text:
            return self.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        return out if np.ndim(prompt) == 2 else out[0]


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise RuntimeInputError(f"texts must be strings, got {type(text).__name__} {text!r:.60}")
    if not text:
        raise RuntimeInputError("text '' is empty; give some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of argv or a file arrive as lone surrogates
        raise RuntimeInputError(
            f"text {text!r:.60} is not valid UTF-8; convert it to UTF-8 first"
        ) from None


def as_ids(values, name: str = "token ids") -> np.ndarray:
    """Token ids as int64, refusing what cannot be ids (floats, strings, ragged rows); an empty
    list passes (numpy makes it float) for the callers' emptiness checks to name."""
    try:
        array = np.asarray(values)
    except ValueError:  # rows of different lengths
        raise RuntimeInputError(
            f"{name} must be rows of equal length; pad them and mark the padding in attention_mask"
        ) from None
    if array.dtype.kind not in "iub" and array.size:
        raise RuntimeInputError(f"{name} must be integers, got {array.dtype}")
    return array.astype(np.int64)


def as_batch(values, name: str = "input_ids") -> np.ndarray:
    """`as_ids` for a `[batch, sequence]` array."""
    array = as_ids(values, name)
    if array.ndim != 2:
        raise RuntimeInputError(
            f"{name} must be a [batch, sequence] array, got shape {array.shape}; "
            "wrap a single sequence as [ids]"
        )
    return array


def load(bundle: str | Path, device: str | None = None, **options) -> Session:
    """Open an exported bundle: checksums verified, on `device` "cpu" or "cuda" (None: CUDA
    when present, else the CPU).
    `options` are `Session`'s: `verify`, `threads`, `expect_sha256` (the manifest's sha256
    that `recast inspect` prints: pins the whole bundle), and for offload bundles `experts`,
    `cache`, `memory_budget`, `policy`, `prefetch` and `cold` (all experts cached by default),
    and for fused bundles `models` (open only the part of the graph those models need)."""
    return Session(bundle, device, **options)
