"""Server extension: many adapters resident on one base, mixed in one batch.

    MLX_LM_OPTIQ=1 mlx_lm.server --model M --optiq-adapter a=path --optiq-adapter b=org/repo

A request picks an adapter with `"model": "a"` (vLLM/LoRAX convention) or
`"adapters": "a"`. The HTTP handler resolves the name (404 listing the mounted
names when unknown) and the request then travels as a *base-model* request with
the adapter name beside it, so the stock batch loop lets requests for different
adapters join the same batch. The generation thread marks each inserted batch
row with its adapter; every forward of the batch runs under `adapter_rows` built
from the batch's uids, which mlx-lm keeps in sync as rows are added and removed.
Prompt-cache entries are keyed by (model key, adapter, mount).

`--optiq-adapter-root DIR` turns on `POST /v1/adapters {"name", "path"}` and
`DELETE /v1/adapters/NAME`; paths must resolve inside DIR.

What the server serves is an `adapters.serving.ServedAdapters` built from the flags
at start-up; the HTTP endpoints are `adapters.admin_api` functions returning
`(status, payload)`. This module only translates flags and HTTP handlers to those.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import sys
from dataclasses import replace
from types import ModuleType

from mlx_lm_optiq.adapters import admin_api, mounting
from mlx_lm_optiq.adapters.config import AdapterServingConfig
from mlx_lm_optiq.adapters.serving import ServedAdapters, start_serving
from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.hooks import on_reset, patching

_SERVED: ServedAdapters | None = None  # while a server with --optiq-adapter/--optiq-adapter-root runs
_ROW_ADAPTERS = contextvars.ContextVar("mlx_lm_optiq_batch_row_adapters", default=None)
_CACHE_TAG = "_optiq_adapter_cache_key"
_UNSET = object()
_log = logging.getLogger(__name__)


def _flag(field_name: str) -> str:
    return "--optiq-" + field_name.replace("_", "-")


@on_reset
def _reset() -> None:
    global _SERVED
    _SERVED = None


# ---------------------------------------------------------------------------
# Flags


def add_arguments(group: argparse._ArgumentGroup) -> None:
    helps = field_help(AdapterServingConfig)
    group.add_argument(
        "--optiq-adapter", action="append", default=None, metavar="NAME=PATH", help=helps["adapter"] + " Repeatable."
    )
    group.add_argument("--optiq-adapter-root", default=None, metavar="DIR", help=helps["adapter_root"])


def after_parse(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Build the served adapters from the flags (reading and checking every adapter); parser.error on bad input."""
    global _SERVED
    try:
        config = AdapterServingConfig(
            adapter=args.optiq_adapter or [], adapter_root=args.optiq_adapter_root, model=args.model
        )
    except ConfigError as e:
        parser.error(e.render(_flag))
    if not config.enabled:
        return
    if args.adapter_path is not None:
        parser.error(
            "--optiq-adapter/--optiq-adapter-root cannot be combined with --adapter-path; "
            "mount that adapter with --optiq-adapter NAME=PATH instead"
        )
    try:
        _SERVED = start_serving(config)
    except ConfigError as e:
        parser.error(e.render(_flag))


# ---------------------------------------------------------------------------
# Server-side wrappers (each passes through when no adapter server is configured)


def _provider_load(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    if _SERVED is not None:
        _SERVED.attach(instance.model)
    return result


def _send_json(handler, status, payload):
    handler._set_completion_headers(status)
    handler.end_headers()
    handler.wfile.write(json.dumps(payload).encode())
    handler.wfile.flush()


def _handle_completion(wrapped, instance, args, kwargs):
    state = _SERVED
    if state is None:
        return wrapped(*args, **kwargs)
    status, payload = admin_api.select_adapter(state, instance.requested_model, instance.adapter)
    if status != 200:
        return _send_json(instance, status, payload)
    # The response echoes `requested_model`; the queue gets the base (see _response_generate).
    instance.adapter = name = payload["adapter"]
    with state.track(name):
        return wrapped(*args, **kwargs)


def _response_generate(wrapped, instance, args, kwargs):
    """Send an adapter request down the queue as a base-model request carrying the adapter name."""
    if _SERVED is not None:
        gen_args = args[1] if len(args) > 1 else kwargs.get("generation_args")
        if gen_args is not None:
            # _handle_completion accepted only the base or a mounted adapter: every
            # request becomes the same base description, so they can share a batch.
            gen_args.optiq_adapter = gen_args.model.adapter
            gen_args.model = replace(gen_args.model, model="default_model", adapter=None)
    return wrapped(*args, **kwargs)


def _tokenize(wrapped, instance, args, kwargs):
    # Runs in the generation thread right before the request's cache lookup and
    # batch insertion (or single serving): make its adapter the active one there.
    if _SERVED is not None:
        gen_args = args[2] if len(args) > 2 else kwargs["args"]
        mounting.ACTIVE_ADAPTER.set(getattr(gen_args, "optiq_adapter", None))
    return wrapped(*args, **kwargs)


def _adapter_model_key(model_key, prompt_cache=None):
    state = _SERVED
    if state is None:
        return model_key
    key = getattr(prompt_cache[0], _CACHE_TAG, _UNSET) if prompt_cache else _UNSET
    if key is _UNSET:
        key = state.cache_key(mounting.ACTIVE_ADAPTER.get())
    return model_key if key is None else (model_key, key)


def _fetch_nearest_cache(wrapped, instance, args, kwargs):
    if _SERVED is None:
        return wrapped(*args, **kwargs)
    model_key, tokens = args
    return wrapped(_adapter_model_key(model_key), tokens)


def _insert_cache(wrapped, instance, args, kwargs):
    if _SERVED is None:
        return wrapped(*args, **kwargs)
    model_key, tokens, prompt_cache = args
    return wrapped(_adapter_model_key(model_key, prompt_cache), tokens, prompt_cache, **kwargs)


# ---------------------------------------------------------------------------
# Batch engine wrappers: per-row adapter selection (generic: any model with mounted adapters)


def _row_map(generator):
    rows = getattr(generator, "_optiq_row_adapters", None)
    if rows is None:
        rows = {}
        generator._optiq_row_adapters = rows
    return rows


def _insert_segments(wrapped, instance, args, kwargs):
    if not mounting.mounted_adapters(instance.model):
        return wrapped(*args, **kwargs)
    name = mounting.ACTIVE_ADAPTER.get()
    if name is not None and name not in mounting.mounted_adapters(instance.model):
        raise mounting.UnknownAdapterError(name, mounting.mounted_adapters(instance.model))
    uids = wrapped(*args, **kwargs)
    rows = _row_map(instance)
    for uid in uids:
        rows[uid] = name
    return uids


def _generator_next(wrapped, instance, args, kwargs):
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is None:
        return wrapped(*args, **kwargs)
    token = _ROW_ADAPTERS.set(rows)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _ROW_ADAPTERS.reset(token)


def _batch_forward(wrapped, instance, args, kwargs):
    """PromptProcessingBatch.prompt / GenerationBatch._step: one adapter per row, from the uids."""
    rows = _ROW_ADAPTERS.get()
    if rows is None or not instance.uids:
        return wrapped(*args, **kwargs)
    names = [rows.get(uid) for uid in instance.uids]
    if _log.isEnabledFor(logging.DEBUG) and len(set(names)) > 1:
        _log.debug(f"mlx_lm_optiq: one {type(instance).__name__} step, {len(names)} rows, adapters {names}")
    with mounting.adapter_rows(instance.model, names):
        return wrapped(*args, **kwargs)


def _tag(model, cache, name):
    state = _SERVED
    if cache and state is not None and state.model is model:
        setattr(cache[0], _CACHE_TAG, state.cache_key(name))


def _generation_next(wrapped, instance, args, kwargs):
    responses = wrapped(*args, **kwargs)
    rows = _ROW_ADAPTERS.get()
    if rows is not None:
        for r in responses:
            if r.finish_reason is not None:
                _tag(instance.model, r.prompt_cache, rows.pop(r.uid, None))
    return responses


def _extract_cache(wrapped, instance, args, kwargs):
    results = wrapped(*args, **kwargs)
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is not None:
        for uid, (cache, _) in results.items():
            _tag(instance.model, cache, rows.get(uid))
    return results


def _remove(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is not None:
        for uid in args[0] if args else kwargs["uids"]:
            rows.pop(uid, None)
    return result


# ---------------------------------------------------------------------------
# HTTP: /v1/models and runtime mounting (admin_api answers; these move the bytes)


def _handle_models(wrapped, instance, args, kwargs):
    state = _SERVED
    if state is None:
        return wrapped(*args, **kwargs)
    model_arg = instance.response_generator.cli_args.model
    return _send_json(instance, *admin_api.list_models(state, model_arg, instance.created))


def _runtime_mounting_off(handler, what):
    return _send_json(
        handler,
        *admin_api.error(
            404, f"runtime adapter {what} is off; start the server with --optiq-adapter-root DIR", "not_found_error"
        ),
    )


def _do_post(wrapped, instance, args, kwargs):
    state = _SERVED
    if state is None or not admin_api.is_adapters_path(instance.path):
        return wrapped(*args, **kwargs)
    if state.root is None:
        return _runtime_mounting_off(instance, "mounting")
    try:
        length = int(instance.headers.get("Content-Length", "0"))
        body = json.loads(instance.rfile.read(length).decode() or "{}")
    except (ValueError, UnicodeDecodeError) as e:
        return _send_json(instance, *admin_api.body_not_json(e))
    return _send_json(instance, *admin_api.mount(state, body))


def _do_delete(handler):
    """APIHandler.do_DELETE (stock mlx-lm has none): DELETE /v1/adapters/NAME."""
    state = _SERVED
    if state is None:
        return _send_json(handler, *admin_api.error(404, "Not Found", "not_found_error"))
    if state.root is None and handler.path.startswith(admin_api.ADAPTERS_PATH + "/"):
        return _runtime_mounting_off(handler, "unmounting")
    return _send_json(handler, *admin_api.unmount(state, handler.path))


def install(server_module: ModuleType) -> None:
    generate_module = sys.modules["mlx_lm.generate"]
    cache_module = sys.modules["mlx_lm.models.cache"]
    wrap = patching.wrap
    wrap(server_module.ModelProvider, "load", _provider_load)
    wrap(server_module.APIHandler, "handle_completion", _handle_completion)
    wrap(server_module.APIHandler, "handle_models_request", _handle_models)
    wrap(server_module.APIHandler, "do_POST", _do_post)
    wrap(server_module.ResponseGenerator, "generate", _response_generate)
    wrap(server_module.ResponseGenerator, "_tokenize", _tokenize)
    wrap(cache_module.LRUPromptCache, "fetch_nearest_cache", _fetch_nearest_cache)
    wrap(cache_module.LRUPromptCache, "insert_cache", _insert_cache)
    wrap(generate_module.BatchGenerator, "insert_segments", _insert_segments)
    wrap(generate_module.BatchGenerator, "_next", _generator_next)
    wrap(generate_module.BatchGenerator, "extract_cache", _extract_cache)
    wrap(generate_module.BatchGenerator, "remove", _remove)
    wrap(generate_module.PromptProcessingBatch, "prompt", _batch_forward)
    wrap(generate_module.GenerationBatch, "_step", _batch_forward)
    wrap(generate_module.GenerationBatch, "next", _generation_next)
    # APIHandler has no DELETE handler to wrap: add one (disable() takes it away again).
    patching.add_attribute(server_module.APIHandler, "do_DELETE", _do_delete)
