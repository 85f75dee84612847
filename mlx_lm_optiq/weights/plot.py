"""PNG of per-layer sensitivity and the chosen bits of a mixed-precision model.

    python -m mlx_lm_optiq.weights.plot MODEL_DIR_OR_optiq_metadata.json --output plot.png

Needs matplotlib (`pip install 'mlx-lm-optiq[plot]'`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.formats import bits_per_weight, candidate_key
from mlx_lm_optiq.weights.metadata import read_metadata

_BLOCK = re.compile(r"layers\.(\d+)\.")


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "mlx_lm_optiq.weights.plot needs matplotlib, which is not installed: "
            "pip install 'mlx-lm-optiq[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def _order(path):
    m = _BLOCK.search(path)
    # embeddings first, then blocks in order, then the head
    return (0 if "embed" in path else (1 if m else 2), int(m.group(1)) if m else 0, path)


def cheapest_kl(layer: dict[str, Any], candidates: Sequence[dict[str, Any]]) -> float:
    """KL of one module at the cheapest candidate measured for it, or NaN (float modules).

    A candidate whose group size does not divide the module's input dims has no KL for it
    (e.g. group 128 on a 576-wide projection), so "cheapest" is per module."""
    kl = layer.get("kl", {})
    costs = {
        candidate_key(c["bits"], c["group_size"], c.get("mode", "affine")): bits_per_weight({"mode": "affine", **c})
        for c in candidates
    }
    measured = [k for k in kl if k in costs]
    return kl[min(measured, key=costs.get)] if measured else float("nan")


def format_label(layer: dict[str, Any]) -> str:
    """Legend label of a module's quantization: "4-bit" (affine), "nvfp4", "mxfp4", ... or "float"."""
    if "group_size" not in layer:
        return "float"
    mode = layer.get("mode", "affine")
    return f"{layer['bits']}-bit" if mode == "affine" else mode


def plot_metadata(meta: dict[str, Any], output: str | Path) -> Path:
    """Write a two-panel PNG: KL of each module at its cheapest candidate, and the chosen bits."""
    plt = _import_pyplot()
    layers = meta["layers"]
    paths = sorted(layers, key=_order)
    kl = [cheapest_kl(layers[p], meta["candidates"]) for p in paths]
    bits = [layers[p]["bits"] for p in paths]
    groups = [layers[p].get("group_size") for p in paths]
    # one colour per format: "4-bit" (affine) and "nvfp4" are both 4 bits, stored differently
    formats = [format_label(layers[p]) for p in paths]
    order = sorted(set(zip(bits, formats)), key=lambda bf: (bf[0], bf[1] != f"{bf[0]}-bit", bf[1]))
    palette = {
        f: c
        for (_, f), c in zip(
            order,
            [
                "tab:red",
                "tab:orange",
                "tab:olive",
                "tab:green",
                "tab:blue",
                "tab:purple",
                "tab:gray",
                "black",
                "tab:brown",
                "tab:pink",
            ],
        )
    }
    colors = [palette.get(f, "black") for f in formats]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(paths) * 0.09), 7), sharex=True)
    x = range(len(paths))
    ax1.bar(x, kl, color=colors)
    ax1.set_yscale("log")
    ax1.set_ylabel("KL at the module's cheapest candidate\n(nats/token)")
    ax1.set_title(
        f"{meta.get('base_model', '')}: target {meta['target_bpw']} bpw, "
        f"achieved {meta['achieved_bpw']:.3f} ({meta.get('method')} sensitivity)"
    )
    ax2.bar(x, bits, color=colors)
    for i, g in enumerate(groups):
        if g and len(paths) <= 80:
            ax2.text(i, bits[i] + 0.1, str(g), ha="center", fontsize=6, rotation=90)
    ax2.set_ylabel("chosen bits (group size above)")
    ax2.set_ylim(0, max(bits) + 1.5)
    ticks = [i for i, p in enumerate(paths) if i == 0 or _order(p)[:2] != _order(paths[i - 1])[:2]]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels([_short(paths[i]) for i in ticks], rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax1.legend(handles, list(palette), loc="upper right", fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _short(path):
    m = _BLOCK.search(path)
    return f"block {m.group(1)}" if m else path.rsplit(".", 1)[-1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot per-layer sensitivity and chosen bits.")
    parser.add_argument("metadata", help="Converted model directory or its optiq_metadata.json.")
    parser.add_argument("--output", required=True, help="PNG file to write.")
    args = parser.parse_args(argv)
    out = plot_metadata(read_metadata(args.metadata, required=("target_bpw", "achieved_bpw")), args.output)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
