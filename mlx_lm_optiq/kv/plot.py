"""PNG of a per-layer KV plan: the K and V bits of every cache slot, and the KL measured there.

    python -m mlx_lm_optiq.kv.plot kv_config.json --output kv.png

The plan is read by `kv.plan_file.read_kv_config` (the one reader of kv_config.json), so a
file the server would refuse is refused here with the same message. Needs matplotlib
(`pip install 'mlx-lm-optiq[plot]'`).
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.plotting import import_pyplot, plot_main, save_figure
from mlx_lm_optiq.kv.candidates import KVCandidate
from mlx_lm_optiq.kv.plan_file import KVPlan, SlotPlan, read_kv_config

PROG = "python -m mlx_lm_optiq.kv.plot"

# keys darker than values; affine blue, turbo purple, float gray
_COLORS = {
    ("affine", "K"): "#08519c",
    ("affine", "V"): "#6baed6",
    ("turbo", "K"): "#54278f",
    ("turbo", "V"): "#9e9ac8",
}
_FLOAT_COLOR = "0.75"
_WINDOW_COLOR = "#fff3c4"
_NO_KV_KINDS = ("ArraysCache", "CacheList")


def chosen_kl(slot: SlotPlan) -> float:
    """KL measured for a slot at the option the plan chose, or NaN (turbo, float, not measured).

    The table measures affine options only ("K/V:GROUP" keys), so that is the one to look up."""
    if slot.scheme != "affine":
        return float("nan")
    return float(slot.kl.get(KVCandidate(slot.k_bits, slot.v_bits, slot.group_size).key, float("nan")))


def _window(slot: SlotPlan) -> int | None:
    """The sliding-window size the file records for a slot (RotatingKVCache), or None."""
    if slot.declared.get("cache") == "RotatingKVCache":
        return slot.declared.get("window") or 0
    return None


def build_figure(plan: KVPlan) -> Any:
    """The figure of `plot_kv_plan` (a matplotlib Figure, not yet saved: tests inspect it).

    Top: per slot, a K bar and a V bar (colour = scheme, group size written above affine
    pairs); float slots are a hatched band; sliding-window slots have a yellow background.
    Bottom (when the file holds KLs): the KL measured at each slot's chosen option."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = import_pyplot(PROG)
    slots = plan.slots
    n = len(slots)
    kls = [chosen_kl(s) for s in slots]
    has_kl = any(not math.isnan(k) for k in kls)
    width = min(22.0, max(8.0, n * 0.36))
    fig, axes = plt.subplots(
        2 if has_kl else 1,
        1,
        figsize=(width, 6.5 if has_kl else 4.2),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 2]} if has_kl else None,
        squeeze=False,
    )
    axes = [a[0] for a in axes]
    ax = axes[0]
    top = max([4] + [b for s in slots for b in (s.k_bits or 0, s.v_bits or 0)]) + 1.5
    windows = {}
    for s in slots:
        w = _window(s)
        if w is not None:
            windows[w] = True
            for a in axes:
                a.axvspan(s.slot - 0.5, s.slot + 0.5, color=_WINDOW_COLOR, zorder=0, lw=0)
    bar = 0.38
    for s in slots:
        if s.scheme == "none":
            no_kv = s.declared.get("cache") in _NO_KV_KINDS
            ax.bar(
                s.slot,
                top,
                width=2 * bar,
                color="white" if no_kv else _FLOAT_COLOR,
                hatch="//" if not no_kv else "..",
                edgecolor="0.7" if no_kv else "0.5",
                lw=0,
                zorder=2,
            )
            continue
        ax.bar(s.slot - bar / 2, s.k_bits, width=bar, color=_COLORS[(s.scheme, "K")], zorder=2)
        ax.bar(s.slot + bar / 2, s.v_bits, width=bar, color=_COLORS[(s.scheme, "V")], zorder=2)
        if s.scheme == "affine":
            ax.text(
                s.slot,
                max(s.k_bits, s.v_bits) + 0.15,
                f"g{s.group_size}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if n > 48 else 0,
                zorder=3,
            )
    ax.set_ylim(0, top)
    ax.set_yticks(sorted({b for s in slots for b in (s.k_bits, s.v_bits) if b}))
    ax.grid(axis="y", color="0.85", lw=0.5, zorder=1)
    ax.set_ylabel("bits per element\n(K left, V right)")

    handles, labels = [], []
    for scheme in ("affine", "turbo"):
        if any(s.scheme == scheme for s in slots):
            for part in ("K", "V"):
                handles.append(Patch(color=_COLORS[(scheme, part)]))
                labels.append(f"{part} ({scheme})")
    if any(s.scheme == "none" and s.declared.get("cache") not in _NO_KV_KINDS for s in slots):
        handles.append(Patch(facecolor=_FLOAT_COLOR, hatch="//", edgecolor="0.5"))
        labels.append("float (not quantized)")
    if any(s.scheme == "none" and s.declared.get("cache") in _NO_KV_KINDS for s in slots):
        handles.append(Patch(facecolor="white", hatch="..", edgecolor="0.7"))
        labels.append("no KV (linear attention / SSM)")
    if windows:
        sizes = sorted(w for w in windows if w)
        handles.append(Patch(color=_WINDOW_COLOR))
        labels.append("sliding window" + (f" ({', '.join(map(str, sizes))} tokens)" if sizes else ""))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8)

    if has_kl:
        kax = axes[1]
        kax.bar(
            range(n),
            [k if k > 0 else float("nan") for k in kls],
            color=[_COLORS.get((s.scheme, "K"), _FLOAT_COLOR) for s in slots],
            width=0.7,
            zorder=2,
        )
        kax.set_yscale("log")
        kax.set_ylabel("KL at the chosen option\n(nats/token, measured\none slot at a time)")
        kax.grid(axis="y", color="0.85", lw=0.5, zorder=1)
    last = axes[-1]
    last.set_xlim(-0.6, n - 0.4)
    last.xaxis.set_major_locator(MaxNLocator(nbins=min(n, max(4, int(width * 2.5))), integer=True))
    if any(s.layer is not None and s.layer != s.slot for s in slots):
        last.set_xlabel("cache slot (the model layer is recorded beside each slot in the file)")
    else:
        last.set_xlabel("cache slot = model layer")

    achieved = f"{plan.achieved_bits:.3f}" if plan.achieved_bits is not None else "?"
    title = (
        f"{plan.model or Path(plan.source).name}: KV cache at {achieved} bits per element "
        f"(target {plan.target_bits}), {n} cache slots"
        + (f", context {plan.context_length}" if plan.context_length else "")
        + (f"; quantized after {plan.quantized_kv_start} tokens" if plan.quantized_kv_start else "")
    )
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width * 9))), fontsize=11)
    return fig


def plot_kv_plan(plan: KVPlan, output: str | Path) -> Path:
    """Write the PNG of `build_figure(plan)` to `output` (its folder is created)."""
    return save_figure(build_figure(plan), output, PROG)


def main(argv: Sequence[str] | None = None) -> int:
    return plot_main(
        argv,
        prog=PROG,
        description="Plot the per-layer K/V bits of a KV plan (and the KL measured at each choice).",
        input_help="A kv_config.json, or the folder (converted model) that holds one.",
        read=read_kv_config,
        plot=plot_kv_plan,
    )


if __name__ == "__main__":
    sys.exit(main())
