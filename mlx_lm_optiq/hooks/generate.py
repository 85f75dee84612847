"""Hooks on `mlx_lm.generate` / `mlx_lm.load`: per-layer KV plans in scripts and `mlx_lm.generate`.

- `load` (mlx_lm.utils, re-exported as mlx_lm.load and bound in mlx_lm.generate):
  a model folder holding kv_config.json gets that plan attached to the model,
  validated at load time (a mismatched config fails here, not mid-generation).
- `generate_step` / `speculative_generate_step`: when a plan is active for the model
  (`kv.apply.use_kv_config(...)`, else the attached one), the prompt cache is built
  from the plan, or a passed-in cache is converted in place; `kv_bits` with a plan
  is an error. Draft-model caches are left alone.
- `batch_generate`: every prompt gets a planned cache (or its passed-in one converted),
  so the plan holds on the batched path too; the per-layer caches have `merge`, so
  batching is kept. (The server's batch path is hooks/server_kv.py's.)
- `setup_arg_parser` (the `mlx_lm.generate` console script): `--optiq-kv-config PATH`
  and `--optiq-no-kv-config`, read right after parsing.
Each wrapper passes straight through when no plan is active.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mlx_lm_optiq.core.jsonio import OptiqFileError
from mlx_lm_optiq.hooks import on_reset, patching

if TYPE_CHECKING:
    from mlx_lm_optiq.kv.plan_file import KVPlan


def _apply() -> ModuleType:
    """`mlx_lm_optiq.kv.apply`, imported at first use, never when this module is imported.

    This hook's installer runs inside the first `import mlx_lm` (the .pth trigger), and a
    kv module may be the one importing mlx_lm: a module-level import here would then see
    that kv module half-initialized (tests/test_hooks.py imports every module first).
    """
    from mlx_lm_optiq.kv import apply

    return apply


def _read_kv_config(path: Any) -> KVPlan:
    from mlx_lm_optiq.kv.plan_file import read_kv_config

    return read_kv_config(path)


_CLI_TOKEN = []


@on_reset
def _clear():
    # the console script's choice was set in this thread's context; undo it
    while _CLI_TOKEN:
        _apply().reset_override(_CLI_TOKEN.pop())


def _check_no_kv_bits(kv_bits, plan: KVPlan):
    if kv_bits is not None:
        raise ValueError(
            f"kv_bits={kv_bits} cannot be combined with the per-layer KV plan {plan.source}; "
            "drop --kv-bits/kv_bits, or switch the plan off with use_kv_config(None)"
        )


def _arg(args, kwargs, index, name):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _planned_step(wrapped, args, kwargs, extra_caches):
    """Call a stock step generator with the plan's prompt cache (or a passed-in one converted).

    extra_caches(args, kwargs) -> caches appended after the model's own (the draft model's).
    """
    model = _arg(args, kwargs, 1, "model")
    plan = _apply().active_plan(model)
    if plan is None:
        return wrapped(*args, **kwargs)
    _check_no_kv_bits(kwargs.get("kv_bits"), plan)
    kwargs = dict(kwargs)
    if kwargs.get("prompt_cache") is None:
        max_kv_size = kwargs.get("max_kv_size") if extra_caches is None else None
        cache = _apply().make_plan_cache(model, plan, max_kv_size=max_kv_size)
        kwargs["prompt_cache"] = cache if extra_caches is None else cache + extra_caches(args, kwargs)
    else:
        # speculative: stock splits the list as model caches first, then the draft model's
        _apply().apply_plan(kwargs["prompt_cache"], plan, model)
    return wrapped(*args, **kwargs)


def _draft_caches(args, kwargs):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(_arg(args, kwargs, 2, "draft_model"))


def _generate_step(wrapped, instance, args, kwargs):
    return _planned_step(wrapped, args, kwargs, None)


def _speculative_generate_step(wrapped, instance, args, kwargs):
    return _planned_step(wrapped, args, kwargs, _draft_caches)


def _batch_generate(wrapped, instance, args, kwargs):
    model = _arg(args, kwargs, 0, "model")
    plan = _apply().active_plan(model)
    if plan is not None:
        args, kwargs = list(args), dict(kwargs)
        prompts = _arg(args, kwargs, 2, "prompts")
        caches = _arg(args, kwargs, 3, "prompt_caches") or [None] * len(prompts)
        # BatchGenerator would make float caches for missing ones: hand it planned caches
        caches = [
            _apply().make_plan_cache(model, plan) if c is None else _apply().apply_plan(c, plan, model) for c in caches
        ]
        if len(args) > 3:
            args[3] = caches
        else:
            kwargs["prompt_caches"] = caches
    return wrapped(*args, **kwargs)


def _load(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    path = _arg(args, kwargs, 0, "path_or_hf_repo")
    found = _apply().find_kv_config(path) if path is not None else None
    if found is not None:
        plan = _read_kv_config(found)
        # validating builds the model graph once; a lazy load defers that to first use
        _apply().attach_plan(result[0], plan, validate=not kwargs.get("lazy"))
        if not _apply().override_is_set():  # else use_kv_config / a CLI flag decides
            print(f"mlx_lm_optiq: per-layer KV plan {plan.source} ({plan.summary()})", file=sys.stderr)
    return result


def _setup_arg_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    group = parser.add_argument_group("mlx_lm_optiq", "per-layer KV cache (mlx-lm-optiq)")
    group.add_argument(
        "--optiq-kv-config",
        default=None,
        metavar="PATH",
        help="Per-layer KV cache plan (kv_config.json or a folder holding one). "
        "Default: the kv_config.json in the model folder, if there is one.",
    )
    group.add_argument(
        "--optiq-no-kv-config", action="store_true", help="Ignore a kv_config.json found in the model folder."
    )
    stock_parse_args = parser.parse_args

    def parse_args(*a, **k):
        ns = stock_parse_args(*a, **k)
        if ns.optiq_kv_config is not None and ns.optiq_no_kv_config:
            parser.error("--optiq-kv-config and --optiq-no-kv-config contradict each other; pass one of them")
        if ns.optiq_kv_config is not None:
            if getattr(ns, "kv_bits", None) is not None:
                parser.error(f"--kv-bits {ns.kv_bits} cannot be combined with --optiq-kv-config")
            try:
                plan = _read_kv_config(ns.optiq_kv_config)
            except OptiqFileError as e:
                parser.error(f"--optiq-kv-config: {e}")
            _CLI_TOKEN.append(_apply().set_override(plan))  # validated against the model at first use
        elif ns.optiq_no_kv_config:
            _CLI_TOKEN.append(_apply().set_override(None))
        return ns

    parser.parse_args = parse_args  # this parser instance only: main() parses once with it
    return parser


def install(module: Any) -> None:
    assert sys.modules.get("mlx_lm.generate") is module
    patching.wrap(module, "generate_step", _generate_step)
    patching.wrap(module, "speculative_generate_step", _speculative_generate_step)
    patching.wrap(module, "setup_arg_parser", _setup_arg_parser)
    patching.wrap(module, "batch_generate", _batch_generate, aliases=[("mlx_lm", "batch_generate")])
    patching.wrap(sys.modules["mlx_lm.utils"], "load", _load, aliases=[("mlx_lm", "load"), ("mlx_lm.generate", "load")])
