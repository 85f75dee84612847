"""Server extension: many adapters resident on one base, mixed in one batch.

    MLX_LM_OPTIQ=1 mlx_lm.server --model M --optiq-adapter a=path --optiq-adapter b=org/repo

A request picks an adapter with `"model": "a"` (vLLM/LoRAX convention) or
`"adapters": "a"`. The HTTP handler resolves the name (404 listing the mounted
names when unknown) and the request then travels as a *base-model* request with
the adapter name beside it, so the stock batch loop lets requests for different
adapters join the same batch. The generation thread marks each inserted batch
row with the adapter mount it starts on; every forward of the batch runs under
`mounting.mounted_rows` built from the batch's uids, which mlx-lm keeps in sync as
rows are added and removed. Prompt-cache entries are keyed by (model key, adapter, mount).
A request holds an `AdapterLease` from its handler to the moment its row leaves the
batch (`serving.BatchRows`), so an adapter in use by any row cannot be unmounted, and
a row whose adapter vanishes anyway fails its own request only.

`--optiq-adapter-root DIR` turns on `POST /v1/adapters {"name", "path"}` and
`DELETE /v1/adapters/NAME`; paths must resolve inside DIR. Stock request forms ("model":
another model, "adapters": a directory) go to mlx-lm untouched (`_STOCK_FORM`), and the
model they load gets no adapters (`_provider_load`).

What the server serves is an `adapters.serving.ServedAdapters` built from the flags
at start-up; the HTTP endpoints are `adapters.admin_api` functions returning
`(status, payload)`. This module only translates flags and HTTP handlers to those.
"""

from __future__ import annotations

import argparse
import contextvars
import io
import json
import logging
import sys
from dataclasses import replace
from types import ModuleType

from mlx_lm_optiq.adapters import admin_api, mounting
from mlx_lm_optiq.adapters.config import AdapterServingConfig
from mlx_lm_optiq.adapters.serving import AdapterGoneError, BatchRows, ServedAdapters, start_serving
from mlx_lm_optiq.core.config import ConfigError, field_help
from mlx_lm_optiq.hooks import on_reset, patching

_SERVED: ServedAdapters | None = None  # while a server with --optiq-adapter/--optiq-adapter-root runs
_ROW_ADAPTERS = contextvars.ContextVar("mlx_lm_optiq_batch_row_adapters", default=None)
# A request's adapter lease on its way to the generation thread: set in its handler thread
# (read by _response_generate), then in the generation thread between _tokenize and the
# row insertion or single serving that takes it (serving.AdapterLease).
_REQUEST_LEASE = contextvars.ContextVar("mlx_lm_optiq_request_lease", default=None)
_PENDING_LEASE = contextvars.ContextVar("mlx_lm_optiq_pending_lease", default=None)
# Set in a handler thread while a stock-form request (admin_api.select_adapter) is handed to mlx-lm.
_STOCK_FORM = contextvars.ContextVar("mlx_lm_optiq_stock_form_request", default=False)
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
    # Adapters live on the base only: a stock-form request ("model": another model, or
    # "adapters": a directory) loads another model, which gets none of them.
    # Another model loaded: no base now (runtime mounts are checked against its shapes
    # meanwhile, and the dropped base is not kept alive).
    if _SERVED is not None:
        _SERVED.attach(instance.model if _is_base(instance) else None)
    return result


def _is_base(provider) -> bool:
    """Whether the provider holds the server's own `--model` with no stock adapter on it."""
    key = provider.model_key
    return key is not None and key[0] == provider.cli_args.model and key[1] is None


def _send_json(handler, status, payload):
    body = json.dumps(payload).encode()
    try:
        handler._set_completion_headers(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):  # the client left; nothing to tell it
        handler.close_connection = True


def _handle_completion(wrapped, instance, args, kwargs):
    state = _SERVED
    if state is None:
        return wrapped(*args, **kwargs)
    with state.lock:  # the selection and its adapter lease at once: no unmount in between
        status, payload = admin_api.select_adapter(state, instance.requested_model, instance.adapter)
        lease = state.acquire(payload["adapter"]) if status == 200 and not payload.get("stock") else None
    if status != 200:
        return _send_json(instance, status, payload)
    if payload.get("stock"):  # mlx-lm serves it as it would without optiq (a model reload)
        token = _STOCK_FORM.set(True)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _STOCK_FORM.reset(token)
    # The response echoes `requested_model`; the queue gets the base (see _response_generate).
    instance.adapter = payload["adapter"]
    return _serve_with_lease(wrapped, args, kwargs, instance, lease)


def _response_generate(wrapped, instance, args, kwargs):
    """Send an adapter request down the queue as a base-model request carrying the adapter name."""
    if _SERVED is not None and not _STOCK_FORM.get():
        gen_args = args[1] if len(args) > 1 else kwargs.get("generation_args")
        if gen_args is not None:
            # _handle_completion accepted only the base or a mounted adapter: every
            # request becomes the same base description, so they can share a batch.
            gen_args.optiq_adapter = gen_args.model.adapter
            gen_args.optiq_lease = _REQUEST_LEASE.get()
            gen_args.model = replace(gen_args.model, model="default_model", adapter=None)
    return wrapped(*args, **kwargs)


def _next_request(wrapped, instance, args, kwargs):
    """ResponseGenerator._next_request (generation thread): a request's lease learns its response queue,
    the one place its handler listens, so a failure of that request alone can be reported there."""
    request = wrapped(*args, **kwargs)
    if request is not None and _SERVED is not None:
        rqueue, _, gen_args = request
        lease = getattr(gen_args, "optiq_lease", None)
        if lease is not None:
            lease.bind(rqueue.put)
    return request


def _tokenize(wrapped, instance, args, kwargs):
    # Runs in the generation thread right before the request's cache lookup and
    # batch insertion (or single serving): make its adapter the active one there, and
    # take its lease over (released when its row leaves the batch or its single serving ends).
    if _SERVED is None:
        return wrapped(*args, **kwargs)
    gen_args = args[2] if len(args) > 2 else kwargs["args"]
    mounting.ACTIVE_ADAPTER.set(getattr(gen_args, "optiq_adapter", None))
    orphan = _PENDING_LEASE.get()
    if orphan is not None:  # a request taken over but never inserted (cannot happen in mlx-lm 0.32)
        orphan.release()
    lease = getattr(gen_args, "optiq_lease", None)
    if lease is not None:
        lease.take()
    _PENDING_LEASE.set(lease)
    try:
        return wrapped(*args, **kwargs)
    except BaseException:  # mlx-lm answers the request with the error and goes on: the request is over
        _PENDING_LEASE.set(None)
        if lease is not None:
            lease.release()
        raise


def _serve_single(wrapped, instance, args, kwargs):
    """ResponseGenerator._serve_single (generation thread): the request, served alone, is over on return."""
    try:
        return wrapped(*args, **kwargs)
    finally:
        lease = _PENDING_LEASE.get()
        if lease is not None:
            _PENDING_LEASE.set(None)
            lease.release()


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


def _row_map(generator) -> BatchRows:
    rows = getattr(generator, "_optiq_row_adapters", None)
    if rows is None:
        rows = BatchRows()
        generator._optiq_row_adapters = rows
    return rows


def _insert_segments(wrapped, instance, args, kwargs):
    """BatchGenerator.insert_segments: each new row records the adapter mount it starts on and the
    request's lease (the server inserts one request per call). A script inserting rows for an
    adapter that is not mounted gets UnknownAdapterError before anything is inserted; a server
    request's row whose adapter vanished is failed alone (serving.BatchRows)."""
    lease = _PENDING_LEASE.get()
    _PENDING_LEASE.set(None)
    name = mounting.ACTIVE_ADAPTER.get()
    mounted = mounting.mounted_adapters(instance.model)
    if name is None and not mounted and getattr(instance, "_optiq_row_adapters", None) is None:
        return wrapped(*args, **kwargs)
    mount = mounted.get(name) if name is not None else None
    if name is not None and mount is None and lease is None:
        raise mounting.UnknownAdapterError(name, mounted)
    uids = wrapped(*args, **kwargs)
    rows = _row_map(instance)
    for uid in uids:
        rows.add(uid, name, mount, lease)
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
    if _log.isEnabledFor(logging.DEBUG):
        names = rows.names(instance.uids)
        if len(set(names)) > 1:
            _log.debug(f"mlx_lm_optiq: one {type(instance).__name__} step, {len(names)} rows, adapters {names}")
    with rows.selected(instance.model, instance.uids):
        return wrapped(*args, **kwargs)


def _tag(model, cache, key):
    state = _SERVED
    if cache and state is not None and state.model is model:
        setattr(cache[0], _CACHE_TAG, key)


def _generation_next(wrapped, instance, args, kwargs):
    """GenerationBatch.next: a finished row has left the batch (its cache keyed by its mount, its lease
    released) before its last token reaches the request's handler, so a client that has read the end
    of its response never finds the adapter still in use."""
    responses = wrapped(*args, **kwargs)
    rows = _ROW_ADAPTERS.get()
    if rows is not None:
        for r in responses:
            if r.finish_reason is not None:
                _tag(instance.model, r.prompt_cache, rows.cache_key(r.uid))
                rows.leave([r.uid])
    return responses


def _extract_cache(wrapped, instance, args, kwargs):
    results = wrapped(*args, **kwargs)
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is not None:
        for uid, (cache, _) in results.items():
            _tag(instance.model, cache, rows.cache_key(uid))
    return results


def _remove(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is not None:
        rows.leave(args[0] if args else kwargs["uids"])
    return result


def _close(wrapped, instance, args, kwargs):
    """BatchGenerator.close: rows still recorded (none, when the server drained the batch) leave."""
    rows = getattr(instance, "_optiq_row_adapters", None)
    if rows is not None:
        rows.leave_all()
    return wrapped(*args, **kwargs)


def _serve_with_lease(wrapped, args, kwargs, handler, lease):
    """Run mlx-lm's handle_completion for a request holding `lease` (None: a base request).

    The lease goes with the request to the generation thread (`_response_generate`); the
    handler releases it only if the generation thread never took it. A request whose
    adapter vanished under it gets that error as its answer (`_answer_gone`).
    """
    token = _REQUEST_LEASE.set(lease)
    try:
        return wrapped(*args, **kwargs)
    except AdapterGoneError as e:
        return _answer_gone(handler, e)
    finally:
        _REQUEST_LEASE.reset(token)
        if lease is not None:
            lease.handler_done()


def _answer_gone(handler, e: AdapterGoneError):
    """The error answer of a request whose adapter was unmounted while it was generated.

    A stream has sent its headers: it gets an error event and ends. A plain request has
    only buffered its 200 headers (mlx-lm sends them with the body): they are dropped and
    a 409 is sent instead.
    """
    status, payload = admin_api.error(409, str(e), "conflict_error")
    handler.close_connection = True
    if getattr(handler, "stream", False):
        try:
            handler.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        return None
    handler._headers_buffer = []
    return _send_json(handler, status, payload)


# ---------------------------------------------------------------------------
# HTTP: /v1/models and runtime mounting (admin_api answers; these move the bytes)


def _handle_models(wrapped, instance, args, kwargs):
    """GET /v1/models[/ID]: the base, the adapters and stock's cached models; a Model object per ID."""
    state = _SERVED
    if state is None:
        return wrapped(*args, **kwargs)
    model_arg = instance.response_generator.cli_args.model
    cached = admin_api.cached_hub_models()
    return _send_json(instance, *admin_api.models_request(state, model_arg, instance.created, instance.path, cached))


def _runtime_mounting_off(handler, what):
    return _send_json(
        handler,
        *admin_api.error(
            404, f"runtime adapter {what} is off; start the server with --optiq-adapter-root DIR", "not_found_error"
        ),
    )


def _do_post(wrapped, instance, args, kwargs):
    """POST /v1/adapters, and a guard for every POST: a body mlx-lm's do_POST would die on
    (not UTF-8, nested too deep, an over-long integer) gets a 400 instead of a traceback."""
    state = _SERVED
    if state is None:
        return wrapped(*args, **kwargs)
    mounting_path = admin_api.is_adapters_path(instance.path)
    if mounting_path and state.root is None:
        return _runtime_mounting_off(instance, "mounting")
    length = instance.headers.get("Content-Length")
    if mounting_path:
        problem = admin_api.content_length_problem(length, admin_api.MAX_ADMIN_BODY)
        if problem is not None:
            return _send_json(instance, *problem)
    else:
        try:
            n = int(length)
        except (TypeError, ValueError):  # missing or not a number: mlx-lm answers 411/400 itself
            return wrapped(*args, **kwargs)
        if n < 0:  # mlx-lm would read to the end of the stream
            return _send_json(instance, *admin_api.content_length_problem(length, None))
    raw = instance.rfile.read(int(length))
    body, problem = admin_api.parse_body(raw)
    if mounting_path:
        return _send_json(instance, *(problem or admin_api.mount(state, body)))
    if problem is not None and not _stock_answers(raw):
        return _send_json(instance, *problem)
    # mlx-lm reads the body itself: hand it the bytes already read, then give back the socket
    rfile, instance.rfile = instance.rfile, io.BytesIO(raw)
    try:
        return wrapped(*args, **kwargs)
    finally:
        instance.rfile = rfile


def _stock_answers(raw: bytes) -> bool:
    """Whether mlx-lm's do_POST answers this body's parse error itself (a plain JSONDecodeError)."""
    try:
        json.loads(raw.decode())
    except json.JSONDecodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False  # it parses, but nests deeper than admin_api.MAX_JSON_DEPTH


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
    wrap(server_module.ResponseGenerator, "_next_request", _next_request)
    wrap(server_module.ResponseGenerator, "_serve_single", _serve_single)
    wrap(cache_module.LRUPromptCache, "fetch_nearest_cache", _fetch_nearest_cache)
    wrap(cache_module.LRUPromptCache, "insert_cache", _insert_cache)
    wrap(generate_module.BatchGenerator, "insert_segments", _insert_segments)
    wrap(generate_module.BatchGenerator, "_next", _generator_next)
    wrap(generate_module.BatchGenerator, "extract_cache", _extract_cache)
    wrap(generate_module.BatchGenerator, "remove", _remove)
    wrap(generate_module.BatchGenerator, "close", _close)
    wrap(generate_module.PromptProcessingBatch, "prompt", _batch_forward)
    wrap(generate_module.GenerationBatch, "_step", _batch_forward)
    wrap(generate_module.GenerationBatch, "next", _generation_next)
    # APIHandler has no DELETE handler to wrap: add one (disable() takes it away again).
    patching.add_attribute(server_module.APIHandler, "do_DELETE", _do_delete)
