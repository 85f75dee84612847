"""Quality vs bits per weight: ours along a BPW grid from one sweep, against mlx-lm's anchors.

    python benchmarks/weights_curve.py [--workdir /tmp/optiq-curve] [--grid 3.0:6.0:0.25] \
        [--anchors uniform,fp4,mixed_4_6,gptq,dynamic_quant[,awq,dwq]] \
        [--output docs/results/weights-curve-cpu.json --svg docs/weights-curve-cpu.svg]

Why: issue 13 asks for the figure users look for, the whole KL-vs-BPW curve of ours and of
every anchor, and whether a 3.5-BPW plan reaches uniform 4-bit g64. Every point is measured
the same way, against the same float reference (the checkpoint's dequantization):

- ours: ONE sensitivity sweep with the product's measuring defaults for this backend
  (`WeightsConfig`: on a CPU fisher on 16x256 tokens; the 16 default candidates), plus the
  2-bit candidates `--two-bit` (each candidate's KL is estimated on its own, so the plans
  without them choose from exactly what a default sweep measures). It is then re-planned at
  every target (no re-measuring: the table is planned again, as `--optiq-sensitivity` does),
  written with the default GPTQ writer (`weights.gptq.compensate`, the pipeline's function,
  on input Hessians computed once for all plans: they do not depend on the plan; `--writer rtn`
  rounds to nearest instead, for quick smoke runs), saved as a stock mlx-lm model and checked with `plan.verify_converted` (bits per layer, BPW <= target).
  Targets: the grid, plus each anchor's exact BPW inside it (a grid point within `--snap` of
  one is replaced by it). "ours + 2-bit" is planned from the same table over `--two-bit-grid`.
- anchors, each at its own BPW and calibrated (where they calibrate) on the same tokens as
  ours: uniform round-to-nearest affine (stock `quantize_model`, stock ranges) at
  `--uniform-bits` x `--uniform-groups`, uniform nvfp4/mxfp4 (stock `--q-mode`),
  mlx-lm's `mixed_4_6` predicate, mlx-lm's GPTQ (`benchmarks/anchor.py gptq`, a subprocess)
  at `--gptq-bits` g64, mlx-lm's `dynamic_quant` (its sensitivities and threshold search, 4:64
  low / 5:64 high, at ours' targets between those two sizes); awq/dwq via `benchmarks/anchor.py`
  only when named in `--anchors` (far too slow on a 2-core CPU).
- "ours + mlx-lm DWQ" at the `--dwq-on-ours` targets: ours (the convert's default candidate rule)
  then distilled by mlx_lm.dwq (`benchmarks/anchor.py dwq --student`), same size as ours.

Evaluation is the repo's own (`mlx_lm_optiq.quality`: each written model reloaded with
stock mlx-lm, dequantized into fp32 = simulated quantization; KL vs the float reference
on held-out text never used for calibration). The reference's logits are computed once and
reused (every point is evaluated alone, so that a run can stop and resume).

Resumable: the float source, calibration, sweep table, Hessians, written models and each
point's result live under `--workdir`; a re-run skips what is there. Points run most
useful first (the 3.5-BPW question, the 4-bit g64 reference, 2-bit at 3.0-3.5, then the rest),
and the JSON/SVG are rewritten after each point; `--render-only` rewrites them from the cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = REPO.parent / "shared"

from weights import _calibration_jsonl, _ints  # noqa: E402  (benchmarks/weights.py: same calibration records)

OURS = "ours"
OURS_2BIT = "ours + 2-bit"
OURS_DWQ = "ours + mlx-lm DWQ"
OURS_DISTILLED = "ours + distillation"
ANCHOR_KINDS = ("uniform", "fp4", "mixed_4_6", "gptq", "dynamic_quant", "awq", "dwq")
DEFAULT_ANCHORS = "uniform,fp4,mixed_4_6,gptq,dynamic_quant"
FP4_FORMATS = ("nvfp4:16", "mxfp4:32")


def _log(msg):
    print(f"[curve] {msg}", flush=True)


def _grid(spec):
    """ "3.0:6.0:0.25" -> [3.0, 3.25, ..., 6.0]; "3.0,3.5" -> [3.0, 3.5]."""
    if ":" in spec:
        lo, hi, step = (float(v) for v in spec.split(":"))
        if step <= 0 or hi < lo:
            raise SystemExit(f"--grid {spec}: expected LO:HI:STEP with STEP > 0 and HI >= LO")
        return [round(lo + i * step, 6) for i in range(int(round((hi - lo) / step)) + 1)]
    return [float(v) for v in spec.split(",") if v.strip()]


def ours_candidates(args):
    """Ours' candidates without the 2-bit ones: --candidates, else the convert's default set."""
    from mlx_lm_optiq.weights.config import DEFAULT_CANDIDATES

    return args.candidates or DEFAULT_CANDIDATES


def _slug(text):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4-exact"))
    p.add_argument(
        "--calibration-text",
        default=str(SHARED / "data" / "text" / "persuasion.txt"),
        help="calibration novel of ours and every calibrating anchor (default Persuasion)",
    )
    p.add_argument("--eval-text", default=str(SHARED / "data" / "text" / "emma.txt"), help="held-out text (Emma)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-sequence-length", type=int, default=512)
    p.add_argument("--num-samples", type=int, help="calibration sequences (default: the backend's convert default)")
    p.add_argument("--sequence-length", type=int, help="calibration tokens per sequence (default: as above)")
    p.add_argument("--grid", default="3.0:6.0:0.25", help="ours' target BPWs: LO:HI:STEP or a list")
    p.add_argument(
        "--candidates", help="ours' candidates (default: the convert's default set, weights.config.DEFAULT_CANDIDATES)"
    )
    p.add_argument("--two-bit", default="2:32,2:64", help="2-bit candidates added to the sweep ('' for none)")
    p.add_argument("--two-bit-grid", default="3.0:4.0:0.25", help="targets of 'ours + 2-bit'")
    p.add_argument("--snap", type=float, default=0.01, help="a grid point this close to an anchor's BPW moves to it")
    p.add_argument("--anchors", default=DEFAULT_ANCHORS, help=f"comma-separated, among {','.join(ANCHOR_KINDS)}")
    p.add_argument("--uniform-bits", default="3,4,5,6,8")
    p.add_argument("--uniform-groups", default="32,64,128")
    p.add_argument(
        "--gptq-bits",
        default="4,2",
        help="mlx-lm GPTQ anchor bits, group 64 (mlx-lm 0.32's gptq quantizes 2, 4 or 8 bits: 3 is refused)",
    )
    p.add_argument(
        "--writer",
        choices=("gptq", "rtn"),
        default="gptq",
        help="how ours' plans are written: gptq (the default writer, weights.gptq.compensate) or rtn "
        "(round to nearest on the table's clipped ranges: no Hessians, quick; for smoke runs)",
    )
    p.add_argument(
        "--dwq-num-samples",
        default="all",
        help="the dwq anchor's training windows (of the sweep's sequence length, from the same calibration text): "
        "default all the text holds, at most mlx_lm.dwq's 2048 — distillation improves with data, and the anchor "
        "should be the strongest a user can run on this text (the sweep's 16 windows give dwq 3 steps)",
    )
    p.add_argument(
        "--dwq-on-ours",
        default="",
        help="targets (a list) where ours, planned as the convert's defaults would (with the 2-bit candidates "
        "below 3.7 BPW), is then distilled by mlx_lm.dwq (anchor.py dwq --student, same windows as the dwq "
        f"anchor): the series '{OURS_DWQ}', same size as ours",
    )
    p.add_argument(
        "--distill-on-ours",
        default="",
        help="targets (a list) where ours, planned as --dwq-on-ours plans it, is then distilled by our own "
        "`--optiq-distill-steps` path (weights.distill: scales and biases against the float model on the "
        f"calibration text at the sweep's sequence length; a GPU convert's default): the series '{OURS_DISTILLED}'",
    )
    p.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="steps of --distill-on-ours (default: the GPU default, weights.config.GPU_DISTILL_STEPS)",
    )
    p.add_argument("--workdir", default="/tmp/optiq-curve", help="cache of everything (re-runs skip what is done)")
    p.add_argument("--output", default=str(REPO / "docs" / "results" / "weights-curve-cpu.json"))
    p.add_argument("--svg", default=str(REPO / "docs" / "weights-curve-cpu.svg"))
    p.add_argument("--plot-range", default=None, help="x range LO:HI of the figure (default: the grid +- 0.1)")
    p.add_argument("--sweep-only", action="store_true", help="measure the sensitivity table and stop")
    p.add_argument("--render-only", action="store_true", help="only rewrite JSON/SVG/table from --workdir")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    args.anchor_kinds = [a.strip() for a in args.anchors.split(",") if a.strip()]
    bad = [a for a in args.anchor_kinds if a not in ANCHOR_KINDS]
    if bad:
        raise SystemExit(f"--anchors: unknown {bad}; choose among {','.join(ANCHOR_KINDS)}")
    # the reference line and the 3.5-BPW question need both; checked before any long work
    if (
        "uniform" not in args.anchor_kinds
        or not {3, 4} <= set(_ints(args.uniform_bits))
        or 64 not in set(_ints(args.uniform_groups))
    ):
        raise SystemExit("--anchors must include uniform at 3 and 4 bits g64: the 3.5-BPW question, the reference line")
    args.workdir = Path(args.workdir)
    return args


# ---------------------------------------------------------------- shared state (float source, sweep)


class CachedReference:
    """The float reference whose logits per evaluation row are computed once.

    quality.evaluate runs the reference next to each model; every point here is evaluated
    alone (so a run can stop and resume), which would recompute the reference each time."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __call__(self, seq):
        import mlx.core as mx
        import numpy as np

        key = np.array(seq).tobytes()
        if key not in self.cache:
            out = self.model(seq)
            mx.eval(out)
            self.cache[key] = out
        return self.cache[key]


class Context:
    """Everything the points share, built once per process (lazily: --render-only needs none)."""

    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "models").mkdir(exist_ok=True)
        (self.work / "points").mkdir(exist_ok=True)
        self.calib_jsonl = self.work / "calibration.jsonl"
        if not self.calib_jsonl.is_file():
            _calibration_jsonl(args.calibration_text, self.calib_jsonl)
        self._table = self._hessians = self._base = None

    # the float source: the checkpoint's dequantization, as the convert pipeline writes it
    @property
    def float_dir(self):
        from mlx_lm_optiq.core import model_tree

        d = self.work / "float"
        if not (d / "config.json").is_file():
            _log(f"writing the float source (dequantized {self.args.model}) to {d}")
            model_tree.write_float_source(self.args.model, d)
        return d

    def weights_config(self):
        """The product's measuring settings for this backend, with the 2-bit candidates added."""
        from mlx_lm_optiq.weights.config import WeightsConfig

        cands = ours_candidates(self.args) + ("," + self.args.two_bit if self.args.two_bit else "")
        sizes = {
            k: getattr(self.args, k) for k in ("num_samples", "sequence_length") if getattr(self.args, k) is not None
        }
        return WeightsConfig(target_bpw=4.5, candidates=cands, calibration=str(self.calib_jsonl), **sizes)

    @property
    def tokens(self):
        from mlx_lm_optiq.weights import pipeline

        if not hasattr(self, "_tokens"):
            self._tokens = pipeline.calibration_tokens(self.args.model, self.weights_config())
        return self._tokens

    @property
    def table(self):
        from mlx_lm_optiq.weights import metadata, pipeline
        from mlx_lm_optiq.weights import table as tables

        if self._table is not None:
            return self._table
        path, info = self.work / "sensitivity.json", self.work / "sweep.json"
        if path.is_file() and info.is_file():
            self._table = metadata.load_sensitivity(path)
            return self._table
        cfg = self.weights_config()
        from mlx_lm_optiq.core.model_tree import load_float_model

        params = pipeline.parameter_count(load_float_model(self.args.model)[0])
        _log("one sweep, planned at every target: " + pipeline.measurement_line(cfg, cfg.candidates, params))
        t0, c0 = time.perf_counter(), time.process_time()
        table = pipeline.measure(self.args.model, cfg, self.tokens)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tables.write_table(table, path)
        info.write_text(
            json.dumps(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "method": cfg.sensitivity_method,
                    "backend": cfg.backend,
                    "defaulted": list(cfg.defaulted),
                    "num_samples": cfg.num_samples,
                    "sequence_length": cfg.sequence_length,
                    "candidates": table["candidates"],
                },
                indent=1,
            )
        )
        _log(f"sweep: {wall:.0f} s wall, {cpu:.0f} s CPU -> {path}")
        self._table = table
        return table

    def load_models(self):
        """The fp16 float source stock convert quantizes, its config and tokenizer, and the fp32
        reference (which is also the model GPTQ reads its float weights and inputs from, as the
        pipeline's writer does on a CPU)."""
        if self._base is not None:
            return
        import mlx.core as mx
        from mlx_lm.utils import load

        from mlx_lm_optiq import quality

        self._base, self.tokenizer, config = load(str(self.float_dir), return_config=True)
        mx.eval(self._base.parameters())
        self.config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        self.reference = quality.load_reference(self.float_dir)[0]
        self.cached_reference = CachedReference(self.reference)
        self.eval_tokens = quality.text_tokens(
            self.tokenizer, self.args.eval_text, self.args.eval_tokens, self.args.eval_sequence_length
        )

    @property
    def base(self):
        self.load_models()
        return self._base

    @property
    def hessians(self):
        """gptq.input_hessians of every Linear module on the table's calibration tokens, once for
        all plans (H depends on the float model's inputs only, not on the plan)."""
        import mlx.core as mx

        from mlx_lm_optiq.weights import gptq

        if self._hessians is not None:
            return self._hessians
        self.load_models()
        arrays, groups = self.work / "hessians.safetensors", self.work / "hessians.json"
        if arrays.is_file() and groups.is_file():
            self._hessians = (dict(mx.load(str(arrays))), json.loads(groups.read_text()))
            return self._hessians
        mods = dict(self.reference.named_modules())
        linear = [p for p in self.table["modules"] if gptq._is_linear(mods.get(p))]
        vocab = self.config.get("vocab_size") or 1
        # the batch size compensate() chooses itself (logits within 1 GiB)
        batch = max(1, min(self.tokens.shape[0], gptq._LOGITS_BYTES // (16 * int(vocab) * self.tokens.shape[1])))
        t0 = time.perf_counter()
        hs, group_of = gptq.input_hessians(self.reference, linear, self.tokens, batch)
        mx.eval(list(hs.values()))
        mx.save_safetensors(str(arrays), hs)
        groups.write_text(json.dumps(group_of))
        _log(f"input Hessians of {len(linear)} Linear modules ({len(hs)} inputs): {time.perf_counter() - t0:.0f} s")
        self._hessians = (hs, group_of)
        return self._hessians


# ---------------------------------------------------------------- points


def _evaluate(ctx, name, path):
    """quality's simulated evaluation of the written model at `path` (reloaded with stock mlx-lm)."""
    from mlx_lm_optiq import quality

    ctx.load_models()
    t0 = time.perf_counter()
    model, bpw, used = quality.load_for_eval(path, "simulated")
    r = quality.evaluate(ctx.cached_reference, {name: model}, ctx.eval_tokens, progress=not ctx.args.no_progress)
    del model
    ref = r["reference"]
    return dict(r[name], bpw=bpw, compute=used, eval_s=time.perf_counter() - t0, reference_ppl=ref["ppl"])


def _save(ctx, dst, model, config):
    from mlx_lm.utils import save

    save(dst, ctx.float_dir, model, ctx.tokenizer, config, donate_model=False)


def _rtn_model(ctx, group_size, bits, mode="affine", predicate=None):
    """Stock quantize_model of the fp16 float source (what `mlx_lm.convert -q` writes)."""
    from mlx_lm.utils import quantize_model

    model = copy.deepcopy(ctx.base)
    return quantize_model(model, copy.deepcopy(ctx.config), group_size, bits, mode=mode, quant_predicate=predicate)


def write_ours(ctx, options, target, dst):
    """Plan the table at `target` over `options`, write it with `--writer` (default: the default
    GPTQ writer; rtn: the planned formats rounded to nearest on the table's clipped ranges), verify."""
    import collections

    from mlx_lm_optiq.core.formats import candidate_key, top_level_quantization
    from mlx_lm_optiq.weights import clipping, gptq, plan

    table = ctx.table
    clipper = clipping.from_table(table)
    pl = plan.plan_for_model(ctx.base, ctx.config, table, options, target)
    gs, bits, mode = top_level_quantization(options)
    model, config = _rtn_model(ctx, gs, bits, mode, plan.quant_predicate(pl["layers"], clipper))
    plan.check_quantized(model, pl["layers"])
    if ctx.args.writer == "gptq":
        mods = dict(model.named_modules())
        dtypes = {p: mods[p].scales.dtype for p, c in pl["layers"].items() if "group_size" in c}
        tensors, summary = gptq.compensate(
            ctx.reference, pl["layers"], ctx.tokens, dtypes, clip=clipper, hessians=ctx.hessians
        )
        gptq.apply_to_model(model, tensors)
        written = {
            "gptq_modules": len(summary["compensated"]),
            "gptq_rtn_modules": len(summary["round_to_nearest"]),
            "gptq_output_error_vs_rtn_median": summary["output_error_vs_rtn_median"],
        }
    else:
        written = {"writer": ctx.args.writer}
    _save(ctx, dst, model, config)
    bpw = plan.verify_converted(dst, pl["layers"], target, pl["predicted_bits"])
    mix = collections.Counter(candidate_key(**c) if "group_size" in c else "float" for c in pl["layers"].values())
    return {"planned_bpw": bpw, "plan_mix": dict(sorted(mix.items())), **written}


def write_rtn(ctx, dst, group_size, bits, mode="affine", predicate=None):
    model, config = _rtn_model(ctx, group_size, bits, mode, predicate)
    _save(ctx, dst, model, config)
    return {}


def write_ours_dwq(ctx, options, target, dst):
    """Ours at `target` (write_ours, into a sibling folder kept for a resume), then mlx_lm.dwq
    distilling its scales and biases against the float model (anchor.py dwq --student): what a
    user gets by running stock `mlx_lm.dwq --quantized-model` on our convert."""
    student = dst.with_name(dst.name + "-student")
    marker = student / "student-written"
    if marker.is_file():
        info = json.loads(marker.read_text())
    else:
        shutil.rmtree(student, ignore_errors=True)
        info = write_ours(ctx, options, target, student)
        marker.write_text(json.dumps(info))
    write_mlx_anchor(ctx, dst, "dwq", None, student=student)
    return {**info, "dwq_student": str(student)}


def write_ours_distilled(ctx, options, target, dst):
    """Ours at `target` (write_ours), then our distillation of its scales and biases (the convert's
    `--optiq-distill-steps` function, weights.distill.distill) on the calibration records at the
    sweep's sequence length: what a GPU convert writes by default."""
    from mlx_lm_optiq.weights import distill
    from mlx_lm_optiq.weights.config import GPU_DISTILL_STEPS

    info = write_ours(ctx, options, target, dst)
    steps = ctx.args.distill_steps or GPU_DISTILL_STEPS
    record = distill.distill(
        dst, ctx.float_dir, str(ctx.calib_jsonl), ctx.weights_config().sequence_length, steps, log=_log
    )
    return {**info, "distill": record}


def write_mlx_anchor(ctx, dst, method, bits, group_size=64, student=None):
    """benchmarks/anchor.py (mlx-lm's gptq/awq/dwq through their Python functions) on our calibration
    tokens; with `student` (dwq only), that quantized model is distilled instead of uniform bits."""
    cfg = ctx.weights_config()  # the sweep's calibration sizes
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "anchor.py"),
        method,
        "--model",
        str(ctx.float_dir),
        "--mlx-path",
        str(dst),
        *(["--bits", str(bits), "--group-size", str(group_size)] if student is None else ["--student", str(student)]),
        "--calibration",
        str(ctx.calib_jsonl),
        "--num-samples",
        str(ctx.args.dwq_num_samples if method == "dwq" else cfg.num_samples),
        "--sequence-length",
        str(cfg.sequence_length),
    ]
    _log(" ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO)
    return {}


def dynamic_quant_sensitivities(ctx):
    """mlx-lm dynamic_quant's own gradient sensitivities (4:64 low, 5:64 high: its CLI defaults), cached."""
    path = ctx.work / "dynamic_quant_sensitivities.json"
    if path.is_file():
        return json.loads(path.read_text())
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    ctx.load_models()
    t0 = time.perf_counter()
    sens = {p: float(v) for p, v in estimate_sensitivities(copy.deepcopy(ctx.reference), ctx.tokens, 4, 64, 5, 64)}
    seconds = time.perf_counter() - t0
    data = {"seconds": seconds, "sensitivities": sens}
    path.write_text(json.dumps(data))
    _log(f"dynamic_quant sensitivities: {seconds:.0f} s")
    return data


def write_dynamic_quant(ctx, dst, target):
    from mlx_lm.quant.dynamic_quant import estimate_threshold

    sens = dynamic_quant_sensitivities(ctx)["sensitivities"]
    threshold = estimate_threshold(ctx.base, sens, target, 4, 64, 5, 64)

    def predicate(p, m):
        if not hasattr(m, "to_quantized"):
            return False
        return {"bits": 5, "group_size": 64} if sens[p] > threshold else True

    return write_rtn(ctx, dst, 64, 4, predicate=predicate)


def run_point(ctx, point, build):
    """Write (unless written) and evaluate one point; its result is cached as points/<slug>.json."""
    slug = _slug(f"{point['series']}@{point['label']}")
    if point["kind"] == "ours" and ctx.args.writer != "gptq":
        slug += f"-{ctx.args.writer}"  # never mixed with (nor resumed as) a default writer's point
    done = ctx.work / "points" / f"{slug}.json"
    if done.is_file():
        return json.loads(done.read_text())
    dst = ctx.work / "models" / slug
    _log(f"{point['series']} {point['label']}: writing {dst}")
    t0 = time.perf_counter()
    failed = ctx.work / "failed" / f"{slug}.json"
    if (dst / "config.json").is_file() and (dst / "point-written").is_file():
        extra = json.loads((dst / "point-written").read_text())
    else:
        try:
            extra = build(dst)
        except Exception as e:  # one anchor that cannot be built must not cost the other points
            failed.parent.mkdir(exist_ok=True)
            failed.write_text(json.dumps(dict(point, error=f"{type(e).__name__}: {e}"), indent=1))
            _log(f"{point['series']} {point['label']}: FAILED ({type(e).__name__}: {e}); recorded in {failed}")
            return None
        (dst / "point-written").write_text(json.dumps(extra))
    failed.unlink(missing_ok=True)
    write_s = time.perf_counter() - t0
    result = dict(point, **extra, write_s=write_s, **_evaluate(ctx, point["label"], dst))
    result["seconds"] = write_s + result["eval_s"]
    target = point.get("target")
    if target is not None and point["kind"] == "ours" and result["bpw"] > target + 1e-9:
        raise RuntimeError(f"{dst}: {result['bpw']} bits per weight exceeds the target {target}")
    done.write_text(json.dumps(result, indent=1))
    _log(
        f"{point['series']} {point['label']}: BPW {result['bpw']:.4f}  KL {result['kl']:.5f}  "
        f"top-1 {result['top1']:.4f}  PPL {result['ppl']:.3f}  ({write_s:.0f} s write, {result['eval_s']:.0f} s eval)"
    )
    return result


# ---------------------------------------------------------------- what to run, in which order


def _uniform_label(bits, group_size):
    return f"{bits}-bit g{group_size}"


def anchor_bpws(ctx):
    """{(series, label): BPW} of the round-to-nearest anchors, from stock quantize_model in memory
    (seconds each; cached): ours is re-planned at these exact sizes."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import compute_bits_per_weight

    path = ctx.work / "anchor_bpw.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    specs = rtn_anchor_specs(ctx)
    for series, label, (gs, bits, mode, predicate_kind) in specs:
        key = f"{series}@{label}"
        if key in cache:
            continue
        predicate = mixed_quant_predicate_builder("mixed_4_6", ctx.base, 64) if predicate_kind else None
        model, _ = _rtn_model(ctx, gs, bits, mode, predicate)
        cache[key] = compute_bits_per_weight(model)
        del model
        path.write_text(json.dumps(cache, indent=1))
    return cache


def rtn_anchor_specs(ctx):
    """(series, label, (group, bits, mode, mixed_4_6?)) of the anchors written by stock quantize_model."""
    a = ctx.args
    specs = []
    if "uniform" in a.anchor_kinds:
        for gs in _ints(a.uniform_groups):
            for bits in _ints(a.uniform_bits):
                specs.append((f"uniform RTN g{gs}", _uniform_label(bits, gs), (gs, bits, "affine", False)))
    if "fp4" in a.anchor_kinds:
        for key in FP4_FORMATS:
            mode, gs = key.split(":")
            specs.append((f"uniform {mode}", key, (int(gs), 4, mode, False)))
    if "mixed_4_6" in a.anchor_kinds:
        specs.append(("mlx-lm mixed_4_6", "mixed_4_6", (64, 4, "affine", True)))
    return specs


def snap(points, anchors, tolerance):
    """Grid targets, each grid point within `tolerance` of an anchor BPW moved onto it, plus the
    other anchor BPWs inside the grid's range; sorted, without duplicates."""
    lo, hi = min(points), max(points)
    out = []
    for t in points:
        near = [b for b in anchors if abs(b - t) <= tolerance]
        out.append(min(near, key=lambda b: abs(b - t)) if near else t)
    out += [b for b in anchors if lo - tolerance <= b <= hi + tolerance]
    return sorted({round(t, 6) for t in out})


def jobs(ctx):
    """Every point as (priority, point, build), most useful first."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    from mlx_lm_optiq.core.formats import parse_candidates
    from mlx_lm_optiq.weights import plan
    from mlx_lm_optiq.weights.config import added_low_bit_candidates

    a = ctx.args
    grid = _grid(a.grid)
    bpw = anchor_bpws(ctx)
    u = {f"{b}:64": bpw.get(f"uniform RTN g64@{_uniform_label(b, 64)}") for b in (3, 4, 5)}
    if u["3:64"] is None or u["4:64"] is None:
        raise SystemExit("--anchors must include uniform at 3 and 4 bits g64: the 3.5-BPW question, the reference line")
    in_range = [b for k, b in bpw.items() if min(grid) - a.snap <= b <= max(grid) + a.snap]
    targets = snap(grid, in_range, a.snap)
    two_bit_grid = _grid(a.two_bit_grid) if a.two_bit_grid.strip() else []  # '' : no 'ours + 2-bit' points
    two_bit_targets = snap(two_bit_grid, in_range, a.snap) if a.two_bit and two_bit_grid else []
    default = parse_candidates(ours_candidates(a))
    everything = parse_candidates(ctx.table["candidates"]) if a.two_bit else default
    # The cheapest plan of each candidate set (the 16 default candidates cannot go below ~3.46
    # BPW): targets below it move up to it, so each curve starts at its own floor.
    floors = {}
    for series, options in ((OURS, default), (OURS_2BIT, everything)):
        floor = plan.plan_for_model(ctx.base, ctx.config, ctx.table, options, 1e3)["min_bpw"]
        floors[series] = math.ceil(floor * 1e4) / 1e4
    (ctx.work / "floors.json").write_text(json.dumps(floors))
    _log(f"cheapest plans: {floors}")
    targets = sorted({max(t, floors[OURS]) for t in targets})
    two_bit_targets = sorted({max(t, floors[OURS_2BIT]) for t in two_bit_targets})
    out = []

    def add(priority, point, build):
        out.append((priority, len(out), point, build))

    key_targets = {
        round(u["3:64"], 6),
        round(u["4:64"], 6),
        *targets[:2],
    }  # the 3.5-BPW question, the reference, the low end
    for t in targets:
        add(
            1 if t in key_targets else 4,
            {"series": OURS, "label": f"@{t:.4f}", "target": t, "kind": "ours"},
            lambda dst, t=t: write_ours(ctx, default, t, dst),
        )
    for t in two_bit_targets:
        add(
            2 if t <= round(u["3:64"], 6) else 4,
            {"series": OURS_2BIT, "label": f"@{t:.4f}", "target": t, "kind": "ours"},
            lambda dst, t=t: write_ours(ctx, everything, t, dst),
        )
    for series, label, (gs, bits, mode, mixed) in rtn_anchor_specs(ctx):
        b = bpw[f"{series}@{label}"]
        first = label in ("4-bit g64", "3-bit g64")
        prio = 0 if first else (5 if min(grid) - a.snap <= b <= max(grid) + a.snap else 7)

        def build(dst, gs=gs, bits=bits, mode=mode, mixed=mixed):
            pred = mixed_quant_predicate_builder("mixed_4_6", ctx.base, 64) if mixed else None
            return write_rtn(ctx, dst, gs, bits, mode, pred)

        add(prio, {"series": series, "label": label, "target": None, "kind": "anchor"}, build)
    if "gptq" in a.anchor_kinds:
        for bits in sorted(_ints(a.gptq_bits), reverse=True):
            add(
                3 if bits == 4 else 7,
                {"series": "mlx-lm GPTQ g64", "label": f"{bits}-bit g64", "target": None, "kind": "anchor"},
                lambda dst, bits=bits: write_mlx_anchor(ctx, dst, "gptq", bits),
            )
    for method in ("awq", "dwq"):
        if method in a.anchor_kinds:
            add(
                6,
                {"series": f"mlx-lm {method.upper()} g64", "label": "4-bit g64", "target": None, "kind": "anchor"},
                lambda dst, method=method: write_mlx_anchor(ctx, dst, method, 4),
            )
    for t in _grid(a.dwq_on_ours) if a.dwq_on_ours else []:
        options = everything if added_low_bit_candidates(t) else default
        add(
            6,
            {"series": OURS_DWQ, "label": f"@{t:.4f}", "target": t, "kind": "ours"},
            lambda dst, t=t, options=options: write_ours_dwq(ctx, options, t, dst),
        )
    for t in _grid(a.distill_on_ours) if a.distill_on_ours else []:
        options = everything if added_low_bit_candidates(t) else default
        add(
            2,
            {"series": OURS_DISTILLED, "label": f"@{t:.4f}", "target": t, "kind": "ours"},
            lambda dst, t=t, options=options: write_ours_distilled(ctx, options, t, dst),
        )
    if "dynamic_quant" in a.anchor_kinds:
        for t in [t for t in targets if u["4:64"] < t < (u["5:64"] or 5.5)]:
            add(
                6,
                {"series": "mlx-lm dynamic_quant 4/5-bit g64", "label": f"@{t:.4f}", "target": t, "kind": "anchor"},
                lambda dst, t=t: write_dynamic_quant(ctx, dst, t),
            )
    return [(p, point, build) for p, _, point, build in sorted(out, key=lambda x: (x[0], x[1]))]


# ---------------------------------------------------------------- outputs


def collect(work):
    """Every finished point under `work`, in series order then by BPW."""
    points = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    return sorted(points, key=lambda r: (r["kind"] != "ours", r["series"], r["bpw"]))


def _series_points(points, series):
    return sorted([r for r in points if r["series"] == series], key=lambda r: r["bpw"])


def ours_at(points, bpw, series=OURS):
    """(KL of `series` at `bpw`, exact?): the point planned at exactly that target, else
    interpolated linearly in log KL between its neighbours; None outside its range."""
    pts = _series_points(points, series)
    for r in pts:
        if r.get("target") is not None and abs(r["target"] - bpw) < 1e-6:
            return r["kl"], True
    below = [r for r in pts if r["bpw"] <= bpw]
    above = [r for r in pts if r["bpw"] >= bpw]
    if not below or not above:
        return None, False
    a, b = below[-1], above[0]
    if b["bpw"] == a["bpw"]:
        return a["kl"], False
    f = (bpw - a["bpw"]) / (b["bpw"] - a["bpw"])
    return math.exp(math.log(a["kl"]) + f * (math.log(b["kl"]) - math.log(a["kl"]))), False


def crossing(points, level, series=OURS):
    """Lowest BPW where `series`' KL falls to `level` (log-linear between points), or None."""
    pts = _series_points(points, series)
    for a, b in zip(pts, pts[1:]):
        if a["kl"] > level >= b["kl"]:
            f = (math.log(a["kl"]) - math.log(level)) / (math.log(a["kl"]) - math.log(b["kl"]))
            return a["bpw"] + f * (b["bpw"] - a["bpw"])
    if pts and pts[0]["kl"] <= level:
        return pts[0]["bpw"]
    return None


def reference_point(points):
    return next((r for r in points if r["series"] == "uniform RTN g64" and r["label"] == "4-bit g64"), None)


def markdown(data):
    points = data["points"]
    lines = [
        "| series | point | target | BPW | KL | top-1 | PPL | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in points:
        t = f"{r['target']:.4f}" if r.get("target") is not None else ""
        lines.append(
            f"| {r['series']} | {r['label']} | {t} | {r['bpw']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | "
            f"{r['ppl']:.3f} | {r['seconds']:.0f} |"
        )
    lines += ["", "| anchor | BPW | anchor KL | ours KL at that BPW | ours / anchor |", "|---|---|---|---|---|"]
    for r in points:
        if r["kind"] != "anchor":
            continue
        kl, exact = ours_at(points, r["bpw"])
        if kl is None:
            continue
        lines.append(
            f"| {r['series']} {r['label']} | {r['bpw']:.4f} | {r['kl']:.5f} | {'' if exact else '~'}{kl:.5f} | "
            f"{kl / r['kl']:.3f}x |"
        )
    two = _series_points(points, OURS_2BIT)
    if two:
        lines += ["", "| target | ours KL | ours + 2-bit KL | with / without |", "|---|---|---|---|"]
        floor = data.get("floors", {}).get(OURS)
        for r in two:
            kl, exact = ours_at(points, r["target"])
            if kl is not None:
                lines.append(
                    f"| {r['target']:.4f} | {'' if exact else '~'}{kl:.5f} | {r['kl']:.5f} | {r['kl'] / kl:.3f}x |"
                )
            elif floor is not None and r["target"] < floor:
                lines.append(f"| {r['target']:.4f} | infeasible (cheapest plan {floor:.4f} BPW) | {r['kl']:.5f} | |")
    for after in (OURS_DWQ, OURS_DISTILLED):
        rows = _series_points(points, after)
        if not rows:
            continue
        lines += ["", f"| target | student: ours KL (series) | {after} KL | with / without |", "|---|---|---|---|"]
        for r in rows:
            base = OURS_2BIT if ours_at(points, r["target"], OURS_2BIT)[1] else OURS
            kl, exact = ours_at(points, r["target"], base)
            before = f"{'' if exact else '~'}{kl:.5f} ({base})" if kl is not None else "not measured"
            ratio = f"{r['kl'] / kl:.3f}x" if kl is not None else ""
            lines.append(f"| {r['target']:.4f} | {before} | {r['kl']:.5f} | {ratio} |")
    ref = reference_point(points)
    if ref is not None:
        for series in (OURS, OURS_2BIT, OURS_DWQ, OURS_DISTILLED):
            x = crossing(points, ref["kl"], series)
            if x is not None:
                lines.append(
                    f"\n{series} reaches uniform 4-bit g64's KL ({ref['kl']:.5f} at {ref['bpw']:.4f} BPW) at "
                    f"~{x:.3f} BPW (log-linear between its points)"
                )
    return "\n".join(lines)


PALETTE = ["#d62728", "#9467bd", "#1f77b4", "#2ca02c", "#17becf", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def svg(data, x_range):
    """The curve as a hand-made SVG: x = BPW (linear), y = KL (log10), one polyline per series,
    a marker per point, the uniform 4-bit g64 KL as a dashed horizontal line, axes and legend."""
    points = [r for r in data["points"] if x_range[0] <= r["bpw"] <= x_range[1] and r["kl"] > 0]
    series = []
    for r in points:
        if r["series"] not in series:
            series.append(r["series"])
    W, H, L, R, T, B = 860, 540, 70, 250, 40, 60
    pw, ph = W - L - R, H - T - B
    kls = [r["kl"] for r in points] or [0.01, 1.0]
    # bounds on the 1-2-5 ladder just outside the data
    ladder = [m * 10.0**e for e in range(-8, 4) for m in (1, 2, 5)]
    y0 = math.log10(max([v for v in ladder if v <= min(kls)] or [ladder[0]]))
    y1 = math.log10(min([v for v in ladder if v >= max(kls)] or [ladder[-1]]))
    y1 = max(y1, y0 + 1)

    def px(b):
        return L + (b - x_range[0]) / (x_range[1] - x_range[0]) * pw

    def py(kl):
        return T + (y1 - math.log10(kl)) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{L + pw / 2}" y="22" text-anchor="middle" font-size="14">{_esc(data["title"])}</text>',
    ]
    for e in range(math.floor(y0), math.ceil(y1) + 1):  # decades, with 2x and 5x minor lines
        for m in (1, 2, 5):
            v = m * 10.0**e
            if not 10.0**y0 * 0.999 <= v <= 10.0**y1 * 1.001:
                continue
            y = py(v)
            out.append(
                f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="{"#ccc" if m == 1 else "#eee"}"/>'
            )
            out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    step = 0.5 if x_range[1] - x_range[0] > 2 else 0.25
    x = math.ceil(x_range[0] / step) * step
    while x <= x_range[1] + 1e-9:
        out.append(f'<line x1="{px(x):.1f}" y1="{T}" x2="{px(x):.1f}" y2="{T + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{T + ph + 18}" text-anchor="middle">{x:g}</text>')
        x += step
    out += [
        f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>',
        f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">bits per weight (mlx-lm compute_bits_per_weight)</text>',
        f'<text x="18" y="{T + ph / 2}" text-anchor="middle" transform="rotate(-90 18 {T + ph / 2})">'
        "KL vs float model, nats/token (log scale)</text>",
    ]
    ref = reference_point(data["points"])
    if ref is not None and 10.0**y0 <= ref["kl"] <= 10.0**y1:
        y = py(ref["kl"])
        out.append(
            f'<line class="reference" x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="black" '
            'stroke-dasharray="6 4"/>'
        )
        out.append(
            f'<text x="{L + pw - 4}" y="{y - 5:.1f}" text-anchor="end">uniform 4-bit g64 ({ref["bpw"]:.2f} BPW): '
            f"KL {ref['kl']:.3f}</text>"
        )
    for i, name in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = _series_points(points, name)
        width = 3 if name.startswith(OURS) else 1.5
        coords = " ".join(f"{px(r['bpw']):.1f},{py(r['kl']):.1f}" for r in pts)
        dash = ' stroke-dasharray="2 3"' if name == OURS_2BIT else ""
        out.append(
            f'<polyline class="series" data-series="{_esc(name)}" points="{coords}" fill="none" '
            f'stroke="{color}" stroke-width="{width}"{dash}/>'
        )
        for r in pts:
            out.append(f'<circle cx="{px(r["bpw"]):.1f}" cy="{py(r["kl"]):.1f}" r="3" fill="{color}"/>')
        ly = T + 10 + 18 * i
        out.append(
            f'<line x1="{L + pw + 14}" y1="{ly}" x2="{L + pw + 40}" y2="{ly}" stroke="{color}" '
            f'stroke-width="{width}"{dash}/>'
        )
        out.append(f'<text x="{L + pw + 46}" y="{ly + 4}">{_esc(name)}</text>')
    foot = data.get("caption", "")
    out.append(f'<text x="{L}" y="{H - 2}" font-size="10" fill="#555">{_esc(foot)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _esc(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render(args, setup):
    points = collect(args.workdir)
    data = {
        "title": "Quality vs bits per weight: SmolLM2-135M, held-out KL vs the float model",
        "caption": setup.get("caption", ""),
        "setup": setup,
        "points": points,
    }
    sweep_info = args.workdir / "sweep.json"
    if sweep_info.is_file():
        data["sweep"] = json.loads(sweep_info.read_text())
    data["failed"] = [json.loads(p.read_text()) for p in sorted((args.workdir / "failed").glob("*.json"))]
    floors = args.workdir / "floors.json"
    if floors.is_file():
        data["floors"] = json.loads(floors.read_text())
    dq = args.workdir / "dynamic_quant_sensitivities.json"
    if dq.is_file():
        data["dynamic_quant_sensitivities_s"] = json.loads(dq.read_text())["seconds"]
    grid = _grid(args.grid)
    x_range = _grid(args.plot_range.replace(":", ",")) if args.plot_range else [min(grid) - 0.1, max(grid) + 0.1]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
    if args.svg:
        Path(args.svg).parent.mkdir(parents=True, exist_ok=True)
        Path(args.svg).write_text(svg(data, x_range))
    return data


def main(argv=None):
    args = parse_args(argv)
    import mlx.core as mx

    setup = {
        "model": args.model,
        "calibration_text": Path(args.calibration_text).name,
        "eval_text": Path(args.eval_text).name,
        "eval_tokens": args.eval_tokens,
        "eval_sequence_length": args.eval_sequence_length,
        "grid": args.grid,
        "two_bit": args.two_bit,
        "two_bit_grid": args.two_bit_grid,
        "anchors": args.anchor_kinds,
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        "compute": "simulated quantization (dequantized to fp32)",
    }
    if args.writer != "gptq":
        setup["writer"] = args.writer  # ours not written by the default writer: said in the JSON
    setup["caption"] = (
        f"calibration {setup['calibration_text']}, eval {args.eval_tokens} tokens of {setup['eval_text']}; "
        f"simulated quantization in fp32; {setup['device']}, mlx {setup['mlx']}"
    )
    if args.render_only:
        print(markdown(render(args, setup)))
        return
    ctx = Context(args)
    _log(f"sensitivity table: {len(ctx.table['modules'])} modules x {len(ctx.table['candidates'])} candidates")
    if args.sweep_only:
        return
    t0 = time.perf_counter()
    todo = jobs(ctx)
    _log(f"{len(todo)} points ({sum(1 for _, p, _ in todo if p['kind'] == 'ours')} of ours), in this order:")
    for priority, point, _ in todo:
        _log(f"  [{priority}] {point['series']} {point['label']}")
    for i, (_, point, build) in enumerate(todo):
        _log(f"point {i + 1}/{len(todo)} ({time.perf_counter() - t0:.0f} s so far)")
        run_point(ctx, point, build)
        render(args, setup)
    print(markdown(render(args, setup)))


if __name__ == "__main__":
    main()
