"""The conversion report: what the conversion kept and what it saves, as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

_ROWS = [
    ("dense_perplexity", "dense perplexity", "{:.3f}"),
    ("moe_perplexity", "MoE perplexity", "{:.3f}"),
    ("perplexity_ratio", "perplexity ratio (MoE / dense)", "{:.4f}"),
    ("oracle_perplexity_ratio", "  with the oracle router", "{:.4f}"),
    ("top1_agreement", "next-token top-1 agreement", "{:.2%}"),
    ("mean_kl", "mean KL(dense || MoE)", "{:.4f}"),
    ("eval_tokens", "evaluation tokens", "{:,}"),
    ("cosine_mean", "embedding cosine (mean)", "{:.4f}"),
    ("oracle_cosine_mean", "  with the oracle router", "{:.4f}"),
    ("cosine_min", "embedding cosine (min)", "{:.4f}"),
    ("similarity_spearman", "Spearman of pairwise similarities", "{:.4f}"),
    ("oracle_similarity_spearman", "  with the oracle router", "{:.4f}"),
    ("eval_sentences", "evaluation sentences", "{:,}"),
    ("params_total", "parameters (total)", "{:,}"),
    ("params_active", "parameters active per token", "{:,}"),
    ("dense_params", "dense parameters", "{:,}"),
    ("active_ffn_fraction", "active FFN fraction", "{:.3f}"),
    ("router_params", "router parameters", "{:,}"),
    ("router_compute_share", "router share of per-token compute", "{:.2%}"),
    ("conversion_seconds", "conversion time (s)", "{:.1f}"),
    ("peak_rss_mb", "peak memory (RSS, MiB)", "{:,.0f}"),
]


@dataclass
class Report:
    name: str
    model: str
    family: str
    experts: dict
    router: str
    compensate: dict = field(default_factory=dict)  # the recipe's compensate section
    metrics: dict[str, float] = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    before_recovery: dict = field(default_factory=dict)
    recovery: dict = field(default_factory=dict)
    stock_check: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "family": self.family,
            "experts": self.experts,
            "router": self.router,
            "compensate": self.compensate,
            "metrics": self.metrics,
            "routing": self.routing,
            "before_recovery": self.before_recovery,
            "recovery": self.recovery,
            "stock_check": self.stock_check,
            "notes": self.notes,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    def table(self) -> str:
        e = self.experts
        title = (
            f"{self.name}: {self.family} -> {e['count']} experts (top-{e['top_k']}, "
            f"shared {e['shared']:.0%}, {e['strategy']}, {e['combine']}), router {self.router}"
        )
        if self.compensate.get("rank"):
            title += f", compensator rank {self.compensate['rank']}"
        rows = [
            (label, fmt.format(self.metrics[key]))
            for key, label, fmt in _ROWS
            if key in self.metrics
        ]
        width = max(len(label) for label, _ in rows)
        lines = [title, "-" * len(title)]
        lines += [f"{label:<{width}}  {value:>14}" for label, value in rows]
        if "mean_recall" in self.routing:
            r = self.routing
            lines.append(f"{'router recall vs oracle (mean)':<{width}}  {r['mean_recall']:>14.3f}")
            lines.append(f"{'expert load CV (mean)':<{width}}  {r['mean_load_cv']:>14.3f}")
            lines.append(
                f"{'oracle top-1 agreement across layers':<{width}}  {r['oracle_top1_agreement']:>14.3f}"
            )
        fits = self.routing.get("compensator_r2")
        if fits:
            mean = sum(fits) / len(fits)
            lines.append(f"{'compensator fit (mean R^2)':<{width}}  {mean:>14.3f}")
        if self.stock_check:
            check = self.stock_check
            lines.append(
                f"{'written ' + check['format'] + ': max |log p diff|':<{width}}  "
                f"{check['max_abs_logprob_diff']:>14.2e}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.metrics.items()}
        return f"Report({self.name!r}, {shown})"
