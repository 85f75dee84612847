"""PNG of per-module sensitivity, chosen bits and group sizes of a mixed-precision model.

    python -m mlx_lm_optiq.weights.plot MODEL_DIR_OR_optiq_metadata.json --output bits.png

One bar per quantized module in model order, blocks shaded alternately and labelled by
number (every Nth block when there are too many to label all), group sizes as a coloured
strip with a legend, so a 200+ module model stays readable.

Needs matplotlib (`pip install 'mlx-lm-optiq[plot]'`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.formats import bits_per_weight, candidate_key
from mlx_lm_optiq.core.plotting import import_pyplot, plot_main, save_figure
from mlx_lm_optiq.weights.metadata import read_metadata

PROG = "python -m mlx_lm_optiq.weights.plot"

_BLOCK = re.compile(r"layers\.(\d+)\.")


def _order(path: str) -> tuple:
    """Sort key: embeddings first, then blocks in order, then the rest (the head). A stable sort
    keeps the sidecar's order (the model's) inside a block, e.g. q k v o gate down up, not a-z."""
    m = _BLOCK.search(path)
    return (0 if "embed" in path else (1 if m else 2), path[: m.start()] if m else "", int(m.group(1)) if m else 0)


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


# one colour per format in every plot, warm (few bits) to cool (many); the 4-bit float
# formats (nvfp4, mxfp4) beside 4-bit affine. Group sizes: light (small) to dark (large).
_FORMAT_COLORS = {
    "2-bit": "tab:brown",
    "3-bit": "tab:red",
    "4-bit": "tab:orange",
    "nvfp4": "tab:olive",
    "mxfp4": "gold",
    "5-bit": "tab:green",
    "6-bit": "tab:blue",
    "8-bit": "tab:purple",
    "float": "tab:gray",
}
_OTHER_COLORS = ["tab:pink", "tab:cyan", "black", "darkslategray"]
_GROUP_COLORS = {16: "#fdd0a2", 32: "#9ecae1", 64: "#4292c6", 128: "#08306b"}


def _blocks(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(label, first index, last index)] of consecutive modules of one block (or one non-block module).

    Labelling blocks, not modules, is what keeps 200+ modules readable."""
    spans: list[tuple[str, int, int]] = []
    key = None
    for i, p in enumerate(paths):
        m = _BLOCK.search(p)
        k = (p[: m.start()], m.group(1)) if m else p
        if k == key:
            spans[-1] = (spans[-1][0], spans[-1][1], i)
        else:
            spans.append((m.group(1) if m else _short(p), i, i))
            key = k
    return spans


def _thin_tick_labels(fig: Any, ax: Any, spans: Sequence[tuple[str, int, int]]) -> None:
    """Label every Nth block (N = 1, 2, 5, 10, ...: the smallest whose labels do not overlap)
    and every non-block module that has room; every block keeps an unlabelled minor tick."""
    centers = [(lo + hi) / 2 for _, lo, hi in spans]
    ax.set_xticks(centers, minor=True)
    ax.tick_params(axis="x", which="minor", length=3)
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform

    def width(label):
        t = ax.text(0, 0, label, fontsize=8)
        w = t.get_window_extent(renderer).width
        t.remove()
        return w

    widths = [width(label) for label, _, _ in spans]
    is_block = [label.isdigit() for label, _, _ in spans]
    block_ids = [i for i, b in enumerate(is_block) if b]
    px_per_block = (
        (to_px((centers[block_ids[-1]], 0))[0] - to_px((centers[block_ids[0]], 0))[0]) / max(1, len(block_ids) - 1)
        if len(block_ids) > 1
        else float("inf")
    )
    widest = max((widths[i] for i in block_ids), default=0)
    stride = next(
        s for s in (1, 2, 5, 10, 20, 50, 100, 200, 1000) if s * px_per_block >= max(widest + 8, 30) or s == 1000
    )
    # non-block modules first (embeddings, head), then every stride-th block, dropping what would overlap
    wanted = [i for i, b in enumerate(is_block) if not b]
    wanted += [i for i in block_ids if int(spans[i][0]) % stride == 0]
    kept: list[tuple[float, float, int]] = []
    for i in wanted:
        x = to_px((centers[i], 0))[0]
        lo, hi = x - widths[i] / 2 - 3, x + widths[i] / 2 + 3
        if all(hi <= k_lo or lo >= k_hi for k_lo, k_hi, _ in kept):
            kept.append((lo, hi, i))
    kept.sort(key=lambda k: k[2])
    ax.set_xticks([centers[i] for _, _, i in kept])
    ax.set_xticklabels([spans[i][0] for _, _, i in kept], fontsize=8)


def build_figure(meta: dict[str, Any]) -> Any:
    """The figure of `plot_metadata` (a matplotlib Figure, not yet saved: tests inspect it).

    Three panels sharing one x axis (one bar per module, in model order): KL at the module's
    cheapest candidate, the chosen bits coloured by format, and a strip of group sizes.
    Blocks are shaded alternately and labelled by number, so 200+ modules stay readable."""
    import textwrap

    plt = import_pyplot(PROG)
    layers = meta["layers"]
    paths = sorted(layers, key=_order)
    n = len(paths)
    kl = [cheapest_kl(layers[p], meta["candidates"]) for p in paths]
    bits = [layers[p]["bits"] for p in paths]
    groups = [layers[p].get("group_size") for p in paths]
    # one colour per format: "4-bit" (affine) and "nvfp4" are both 4 bits, stored differently
    formats = [format_label(layers[p]) for p in paths]
    order = sorted(set(zip(bits, formats)), key=lambda bf: (bf[0], bf[1] != f"{bf[0]}-bit", bf[1]))
    others = iter(_OTHER_COLORS * len(order))
    palette = {f: _FORMAT_COLORS.get(f) or next(others) for _, f in order}
    colors = [palette.get(f, "black") for f in formats]

    width = min(22.0, max(9.0, n * 0.085))
    fig, (ax1, ax2, ax3) = plt.subplots(
        3,
        1,
        figsize=(width, 7.5),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 2.2, 0.35]},
    )
    spans = _blocks(paths)
    for label, lo, hi in spans:
        if label.isdigit() and int(label) % 2:
            for ax in (ax1, ax2, ax3):
                ax.axvspan(lo - 0.5, hi + 0.5, color="0.93", zorder=0, lw=0)
    x = range(n)
    ax1.bar(x, kl, color=colors, width=0.8, zorder=2)
    ax1.set_yscale("log")
    ax1.set_ylabel("KL at the module's\ncheapest candidate\n(nats/token)")
    ax2.bar(x, bits, color=colors, width=0.8, zorder=2)
    ax2.set_ylabel("chosen bits")
    ax2.set_ylim(0, max(bits) + 0.5)
    ax2.set_yticks(sorted(set(bits)))
    ax2.grid(axis="y", color="0.8", lw=0.5, zorder=1)
    gpalette = {g: _GROUP_COLORS.get(g, "tab:gray") for g in sorted({g for g in groups if g})}
    ax3.bar(x, [1 if g else 0 for g in groups], color=[gpalette.get(g, "white") for g in groups], width=1.0)
    ax3.set_ylim(0, 1)
    ax3.set_yticks([])
    ax3.set_ylabel("group", rotation=0, ha="right", va="center")
    ax3.set_xlim(-0.6, n - 0.4)
    first = next(((lo, hi) for label, lo, hi in spans if label.isdigit()), None)
    inside = [p.rsplit(".", 1)[-1] for p in paths[first[0] : first[1] + 1]] if first else []
    ax3.set_xlabel(
        "transformer block (one bar per quantized module, in model order"
        + (f"; in a block: {' '.join(n.removesuffix('_proj') for n in inside)}" if 1 < len(inside) <= 12 else "")
        + ")"
    )

    title = (
        f"{meta.get('base_model', '')}: target {meta['target_bpw']} bpw, "
        f"achieved {meta['achieved_bpw']:.3f} ({meta.get('method')} sensitivity, {n} modules)"
    )
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width * 9))), fontsize=11)
    fmt_handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax1.legend(fmt_handles, list(palette), title="format", loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8)
    group_handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in gpalette.values()]
    ax2.legend(
        group_handles,
        [f"g{g}" for g in gpalette],
        title="group size\n(bottom strip)",
        loc="lower left",
        bbox_to_anchor=(1.005, 0),
        fontsize=8,
    )
    fig.canvas.draw()  # tick labels are thinned from their drawn sizes
    _thin_tick_labels(fig, ax3, spans)
    return fig


def plot_metadata(meta: dict[str, Any], output: str | Path) -> Path:
    """Write a PNG of a mixed-precision model: KL of each module at its cheapest candidate,
    the chosen bits and the group sizes (see `build_figure`)."""
    return save_figure(build_figure(meta), output, PROG)


def _short(path: str) -> str:
    """Tick label of a module outside the blocks: its last name, shortened ("embed", "head")."""
    name = path.rsplit(".", 1)[-1]
    return {"embed_tokens": "embed", "lm_head": "head"}.get(name, name)


def main(argv: Sequence[str] | None = None) -> int:
    return plot_main(
        argv,
        prog=PROG,
        description="Plot per-module sensitivity, chosen bits and group sizes of a mixed-precision model.",
        input_help="Converted model directory or its optiq_metadata.json.",
        read=lambda path: read_metadata(path, required=("target_bpw", "achieved_bpw")),
        plot=plot_metadata,
    )


if __name__ == "__main__":
    sys.exit(main())
