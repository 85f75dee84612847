"""Server extension: `mlx_lm.server --optiq-kv-config kv_config.json` (per-layer KV, batching kept).

The plan is validated against the model at start-up (a lazy load: shapes only),
so a mismatched config stops the server with the file and field named. While
serving, every prompt cache the server makes for that model comes from the plan:

* `mlx_lm.server.make_prompt_cache` — the single-request path (`_serve_single`)
  and `ModelProvider._load`'s batchability probe (our caches have `merge`, so
  stock `_is_batchable` stays True and requests keep batching);
* `mlx_lm.generate.make_prompt_cache` — what `BatchGenerator.insert_segments`
  calls for new requests on the continuous-batching path.

Prompt-cache reuse needs nothing more: LRUPromptCache deep-copies and trims the
caches, which are ordinary KVCache/BatchKVCache subclasses.
"""

from __future__ import annotations

import importlib
import logging
import sys
import weakref
from typing import Any

from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.hooks import on_reset, patching
from mlx_lm_optiq.kv import attention
from mlx_lm_optiq.kv.apply import attach_plan, find_kv_config, make_plan_cache, use_kv_config
from mlx_lm_optiq.kv.plan_file import KVPlan, load_kv_config

# The plan the server was started with and the model object it applies to.
# `decided`: the server chose for --model (a plan, or float with --optiq-no-kv-config).
_STATE = {"model_path": None, "plan": None, "model": None, "decided": False}


@on_reset
def _clear():
    _STATE.update(model_path=None, plan=None, model=None, decided=False)


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--optiq-kv-config",
        default=None,
        metavar="PATH",
        help="Per-layer KV cache plan (kv_config.json, or a folder holding one) for --model. "
        "Default: the kv_config.json in the model folder, if there is one.",
    )
    group.add_argument(
        "--optiq-no-kv-config",
        action="store_true",
        help="Ignore a kv_config.json found in the model folder (serve with a float KV cache).",
    )


def after_parse(args: Any, parser: Any) -> None:
    path = args.optiq_kv_config
    if path is not None and args.optiq_no_kv_config:
        parser.error("--optiq-kv-config and --optiq-no-kv-config contradict each other; pass one of them")
    if path is None and not args.optiq_no_kv_config and args.model is not None:
        path = find_kv_config(args.model)
    if path is None:
        if args.optiq_no_kv_config:
            _STATE.update(model_path=args.model, plan=None, model=None, decided=True)
        return
    if args.model is None:
        parser.error("--optiq-kv-config needs --model: the plan is validated against that model at start-up")
    if args.kv_bits is not None:
        parser.error(
            f"--kv-bits {args.kv_bits} cannot be combined with the per-layer KV plan {path}: the plan sets "
            "every layer's bits; drop --kv-bits (or pass --optiq-no-kv-config to use --kv-bits alone)"
        )
    try:  # a bad MLX_LM_OPTIQ_KV_ATTENTION stops start-up, not the first request
        attention_path = attention.selected_path()
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    plan = _load_and_validate(path, args.model, parser)
    _STATE.update(model_path=args.model, plan=plan, model=None, decided=True)
    print(
        f"mlx_lm_optiq: per-layer KV plan {plan.source} ({plan.summary()}; quantized from token "
        f"{plan.quantized_kv_start}; attention: {attention_path})",
        file=sys.stderr,
    )


def _load_and_validate(path, model_path, parser) -> KVPlan:
    from mlx_lm.utils import load  # looked up at call time: the load hook may have wrapped it

    try:
        model = load(model_path, lazy=True)[0]  # weights stay on disk: validation needs shapes only
    except Exception as e:
        parser.error(f"--optiq-kv-config: could not load --model {model_path} to validate the plan: {e}")
    try:
        return load_kv_config(path, model)
    except (OptiqFileError, ValueError) as e:
        parser.error(f"--optiq-kv-config: {e}")


def _plan_for(model):
    held = _STATE["model"]
    if _STATE["plan"] is not None and held is not None and held() is model:
        return _STATE["plan"]
    return None


def _load(wrapped, instance, args, kwargs):
    path = args[0] if args else kwargs.get("path_or_hf_repo")
    if not (_STATE["decided"] and str(path) == str(_STATE["model_path"])):
        return wrapped(*args, **kwargs)
    plan = _STATE["plan"]
    with use_kv_config(plan):  # tells the scripts-path load hook that the server decides
        result = wrapped(*args, **kwargs)
    model = result[0]
    _STATE["model"] = weakref.ref(model)
    # The scripts-path hook (hooks/generate.py) attaches a plan found in the model
    # folder and applies it in generate_step; the server's choice (its flag, or
    # --optiq-no-kv-config) must win there too, or the single-request path would
    # serve a different cache than the batched one.
    attach_plan(model, plan, validate=False)
    if plan is not None:
        logging.info("mlx_lm_optiq: KV plan %s applies to the loaded model", plan.source)
    return result


def _make_prompt_cache(wrapped, instance, args, kwargs):
    model = args[0] if args else kwargs.get("model")
    plan = _plan_for(model)
    if plan is None:
        return wrapped(*args, **kwargs)
    # Affine slots are MixedQuantizedKVCaches: they have `merge`, so stock
    # `_is_batchable` stays True and BatchGenerator can batch them.
    max_kv_size = args[1] if len(args) > 1 else kwargs.get("max_kv_size")
    return make_plan_cache(model, plan, max_kv_size=max_kv_size)


def install(server_module: Any) -> None:
    patching.wrap(server_module, "load", _load)
    patching.wrap(server_module, "make_prompt_cache", _make_prompt_cache)
    patching.wrap(importlib.import_module("mlx_lm.generate"), "make_prompt_cache", _make_prompt_cache)
