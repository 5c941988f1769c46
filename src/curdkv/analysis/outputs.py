"""JSON, Markdown and PNG outputs of ``curdkv analyze``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..report import markdown_table, pyplot


def write_reconstruction(result: dict, out: Path, meta: dict) -> str:
    """``reconstruction.json``, ``reconstruction.md`` and ``reconstruction.png``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction.json").write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    presses = list(dict.fromkeys(r["press"] for r in result["summary"]))
    ratios = sorted({r["compression_ratio"] for r in result["summary"]})
    cells = {(r["press"], r["compression_ratio"]): r for r in result["summary"]}
    blocks = [f"Model {meta['model']}, {meta['context_tokens']} context tokens compressed, "
              f"{meta['future_tokens']} following queries; means over layers and query heads."]
    for key, title in (("output_error", "output error ‖ΔO‖/‖O‖"), ("logit_error", "logit error ‖ΔQKᵀ‖/‖QKᵀ‖")):
        rows = [{"press": p, **{f"{c:.0%}": cells[p, c][key] for c in ratios}} for p in presses]
        table = markdown_table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                               [("press", "press")] + [(f"{c:.0%}", f"{c:.0%}") for c in ratios])
        blocks.append(f"### {title}\n\n{table}")
    text = "\n\n".join(blocks) + "\n"
    (out / "reconstruction.md").write_text(text)
    _plot_per_layer(result["per_layer"], ratios, out / "reconstruction.png", meta["model"])
    return text


def _plot_per_layer(rows: list[dict], ratios: list[float], path: Path, model: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(ratios), figsize=(5.5 * len(ratios), 7), squeeze=False)
    lines = defaultdict(list)
    for r in rows:
        lines[r["press"], r["compression_ratio"]].append(r)
    for j, ratio in enumerate(ratios):
        for i, (key, label) in enumerate((("output_error", "output error"), ("logit_error", "logit error"))):
            ax = axes[i][j]
            for (press, c), points in lines.items():
                if c == ratio:
                    points = sorted(points, key=lambda r: r["layer"])
                    ax.plot([p["layer"] for p in points], [p[key] for p in points], marker=".", label=press)
            ax.set_title(f"{model}: {label} at {ratio:.0%}", fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eviction(result: dict, out: Path, meta: dict) -> str:
    """``eviction.json`` and ``eviction.png`` (mean attention vs eviction error, log-log); returns a summary line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eviction.json").write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(result["mean_attention"], result["eviction_error"], s=6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean attention score")
    ax.set_ylabel("output error when evicted alone")
    ax.set_title(f"{meta['model']} layer {result['layer']} head {result['head']}: "
                 f"Spearman {result['spearman']:.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "eviction.png", dpi=110)
    plt.close(fig)
    return (f"layer {result['layer']}, head {result['head']}, {result['context_tokens']} tokens: "
            f"Spearman(mean attention, eviction error) = {result['spearman']:.3f}")
