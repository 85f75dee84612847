"""The plots: `python -m mlx_lm_optiq.weights.plot` and `python -m mlx_lm_optiq.kv.plot`.

Besides writing a PNG, each figure must stay readable at the sizes real models have (211
modules for SmolLM2, 30 KV slots): tick labels that do not overlap, group sizes shown for
every module, nothing (title, labels, legends) cut off at the figure's edge."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from mlx_lm_optiq.kv import plot as kv_plot  # noqa: E402
from mlx_lm_optiq.kv.plan_file import plan_from_dict, read_kv_config  # noqa: E402
from mlx_lm_optiq.weights import plot as weights_plot  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SIDECAR = RESULTS / "quickstart-clipping-optiq_metadata.json"  # the full SmolLM2: 211 modules
KV_CONFIG = RESULTS / "smollm2-kv_config.json"  # 30 cache slots
_BLOCK = re.compile(r"layers\.(\d+)\.")


def _sidecar(max_blocks=None):
    meta = json.loads(SIDECAR.read_text())
    if max_blocks is not None:
        meta["layers"] = {
            k: v
            for k, v in meta["layers"].items()
            if not _BLOCK.search(k) or int(_BLOCK.search(k).group(1)) < max_blocks
        }
    return meta


def _many_blocks(num_blocks):
    """A sidecar of a deep model: the 7 modules of SmolLM2's block 0 repeated `num_blocks` times."""
    meta = _sidecar()
    block = {k: v for k, v in meta["layers"].items() if ".layers.0." in k}
    layers = {"model.embed_tokens": meta["layers"]["model.embed_tokens"]}
    for b in range(num_blocks):
        for k, v in block.items():
            layers[k.replace(".layers.0.", f".layers.{b}.")] = copy.deepcopy(v)
    layers["lm_head"] = copy.deepcopy(meta["layers"]["model.embed_tokens"])
    meta["layers"] = layers
    return meta


def _overlaps(boxes):
    return [
        (a, b)
        for i, (a, ba) in enumerate(boxes)
        for b, bb in boxes[i + 1 :]
        if ba.x0 < bb.x1 - 0.5 and bb.x0 < ba.x1 - 0.5 and ba.y0 < bb.y1 - 0.5 and bb.y0 < ba.y1 - 0.5
    ]


def readability_problems(fig, max_xticks=45):
    """What makes a figure hard to read: overlapping or too many x tick labels, overlapping
    annotations, anything drawn outside the figure (a cut-off title, label or legend)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    problems = []

    def outside(what, bb):
        if bb.x0 < box.x0 - 1 or bb.x1 > box.x1 + 1 or bb.y0 < box.y0 - 1 or bb.y1 > box.y1 + 1:
            problems.append(f"{what} outside the figure: {bb.bounds} not in {box.bounds}")

    title = fig._suptitle
    if title is None or not title.get_text():
        problems.append("no title")
    else:
        outside(f"title {title.get_text()!r}", title.get_window_extent(renderer))
    for ax in fig.axes:
        outside(f"axes {ax.get_ylabel()!r} with its labels and legend", ax.get_tightbbox(renderer))
        lo, hi = sorted(ax.get_xlim())
        labels = [
            (t.get_text(), t.get_window_extent(renderer))
            for x, t in zip(ax.get_xticks(), ax.get_xticklabels())
            if lo <= x <= hi and t.get_visible() and t.get_text()
        ]
        if len(labels) > max_xticks:
            problems.append(f"{len(labels)} x tick labels (more than {max_xticks})")
        problems += [f"x tick labels {a!r} and {b!r} overlap" for a, b in _overlaps(labels)]
        notes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_visible() and t.get_text()]
        problems += [f"annotations {a!r} and {b!r} overlap" for a, b in _overlaps(notes)]
    return problems


def _png_size(path):
    img = plt.imread(path)
    return img.shape[1], img.shape[0]


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("blocks", [None, 4, 80], ids=["smollm2-211-modules", "4-layer", "80-blocks"])
def test_weights_plot_stays_readable(blocks):
    meta = _sidecar(blocks) if blocks != 80 else _many_blocks(80)
    fig = weights_plot.build_figure(meta)
    try:
        assert readability_problems(fig) == []
        labels = [t.get_text() for t in fig.axes[-1].get_xticklabels() if t.get_text()]
        numbers = [int(t) for t in labels if t.isdigit()]
        if blocks == 80:  # every 2nd block labelled, the embedding and the head too
            assert labels[0] == "embed" and labels[-1] == "head" and numbers == list(range(2, 80, 2))
        else:
            assert labels == ["embed"] + [str(b) for b in range(blocks or 30)]
        # the group size of every module is shown (bottom strip), one colour per size, in the legend
        (strip,) = fig.axes[2].containers
        groups = [e.get("group_size") for e in meta["layers"].values()]
        legend = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
        assert {f"g{g}" for g in groups if g} <= legend
        colours = [to_hex(p.get_facecolor()) for p in strip if p.get_height() > 0]
        assert len(colours) == len(groups)
        for g in set(groups):
            assert colours.count(to_hex(weights_plot._GROUP_COLORS[g])) == groups.count(g)
    finally:
        plt.close(fig)


def run_module(module, argv, capsys):
    """`python -m <module> <argv>` in this interpreter (runpy runs the module's `__main__` block, as
    `-m` does; a fresh interpreter would spend seconds importing mlx_lm): (exit code, stdout, stderr)."""
    import runpy
    import warnings

    capsys.readouterr()
    saved = sys.argv
    sys.argv = [module, *map(str, argv)]
    code = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": the tests imported it
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out, out.err


def test_weights_plot_command_writes_a_png_of_sane_size(tmp_path, capsys):
    out = tmp_path / "bits.png"
    code, stdout, stderr = run_module("mlx_lm_optiq.weights.plot", [SIDECAR, "--output", out], capsys)
    assert code == 0, stderr[-3000:]
    assert stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = _png_size(out)
    assert 1200 <= width <= 2600 and 600 <= height <= 1200, (width, height)
    assert 30_000 < out.stat().st_size < 2_000_000


def test_weights_plot_names_a_missing_sidecar(tmp_path, capsys):
    assert weights_plot.main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "b.png")]) == 2
    assert f"error: {tmp_path / 'nowhere'}" in capsys.readouterr().err and not (tmp_path / "b.png").exists()


# ----------------------------------------------------------------------------- kv


def test_kv_plot_of_a_real_plan(tmp_path, capsys):
    plan = read_kv_config(KV_CONFIG)
    fig = kv_plot.build_figure(plan)
    try:
        assert readability_problems(fig) == []
        bits_ax, kl_ax = fig.axes
        # a K and a V bar per slot at the planned bits, and the group size written above it
        bars = sorted((round(p.get_x() + p.get_width() / 2, 2), p.get_height()) for c in bits_ax.containers for p in c)
        expected = sorted(
            (round(s.slot + d, 2), b) for s in plan.slots for d, b in ((-0.19, s.k_bits), (0.19, s.v_bits))
        )
        assert bars == expected
        assert [t.get_text() for t in bits_ax.texts] == [f"g{s.group_size}" for s in plan.slots]
        # the KL panel: what was measured at each slot's chosen option
        kl = [p.get_height() for p in kl_ax.containers[0]]
        assert kl == [s.kl[f"{s.k_bits}/{s.v_bits}:{s.group_size}"] for s in plan.slots]
    finally:
        plt.close(fig)
    out = tmp_path / "kv.png"
    code, stdout, stderr = run_module("mlx_lm_optiq.kv.plot", [KV_CONFIG, "--output", out], capsys)
    assert code == 0, stderr[-3000:]
    assert stdout.strip() == f"wrote {out}"
    width, height = _png_size(out)
    assert 800 <= width <= 2600 and 400 <= height <= 1200, (width, height)
    assert 20_000 < out.stat().st_size < 2_000_000


def test_kv_plot_marks_schemes_and_sliding_windows():
    """Gemma-like: 5 sliding-window slots per global one; turbo, float and no-KV slots."""
    layers = []
    for i in range(26):
        e = {"layer": i, "cache_slot": i, "n_kv_heads": 1, "k_head_dim": 256, "v_head_dim": 256}
        if i % 6 != 5:
            e.update(cache="RotatingKVCache", window=512, scheme="affine", k_bits=8, v_bits=4, group_size=64)
        elif i < 20:
            e.update(cache="KVCache", scheme="turbo", k_bits=3, v_bits=4)
        else:
            e.update(cache="KVCache", scheme="none")
        layers.append(e)
    layers[1] = {"layer": 1, "cache_slot": 1, "cache": "ArraysCache", "scheme": "none"}
    plan = plan_from_dict({"model": "gemma-like", "target_bits": 5.0, "achieved_bits": 5.1, "layers": layers})
    fig = kv_plot.build_figure(plan)
    try:
        assert readability_problems(fig) == []
        (ax,) = fig.axes  # no KL recorded: one panel
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [
            "K (affine)",
            "V (affine)",
            "K (turbo)",
            "V (turbo)",
            "float (not quantized)",
            "no KV (linear attention / SSM)",
            "sliding window (512 tokens)",
        ]
        windows = [p for p in ax.patches if to_hex(p.get_facecolor()) == kv_plot._WINDOW_COLOR]
        assert len(windows) == sum(e.get("cache") == "RotatingKVCache" for e in layers)
        hatched = [p for p in ax.patches if p.get_hatch()]
        assert len(hatched) == sum(e["scheme"] == "none" for e in layers)
    finally:
        plt.close(fig)


def test_kv_plot_refuses_an_invalid_plan_with_the_readers_message(tmp_path, capsys):
    bad = json.loads(KV_CONFIG.read_text())
    bad["layers"][3]["k_bits"] = 7
    (tmp_path / "kv_config.json").write_text(json.dumps(bad))
    assert kv_plot.main([str(tmp_path), "--output", str(tmp_path / "kv.png")]) == 2
    err = capsys.readouterr().err
    assert "kv_config.json: layers[3]: field 'k_bits' is 7" in err and not (tmp_path / "kv.png").exists()
