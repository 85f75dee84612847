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
"""

import contextlib
import contextvars
import json
import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path

from .. import _patching, adapters
from . import on_reset

_STATE = None  # _ServerAdapters while a server with --optiq-adapter/--optiq-adapter-root runs
_ROW_ADAPTERS = contextvars.ContextVar("mlx_lm_optiq_batch_row_adapters", default=None)
_CACHE_TAG = "_optiq_adapter_cache_key"
_UNSET = object()
_log = logging.getLogger(__name__)


class _ServerAdapters:
    def __init__(self, weights, root, base_ids):
        self.weights = dict(weights)  # name -> AdapterWeights, mounted on every (re)loaded base
        self.root = root
        self.base_ids = base_ids
        self.model = None
        self.lock = threading.RLock()
        self.in_flight = {}

    def names(self):
        return sorted(self.weights)

    @contextlib.contextmanager
    def track(self, name):
        with self.lock:
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight[name] -= 1

    def cache_key(self, name):
        if name is None or self.model is None:
            return None
        return adapters.adapter_cache_key(self.model, name)


@on_reset
def _reset():
    global _STATE
    _STATE = None


# ---------------------------------------------------------------------------
# Flags


def add_arguments(group):
    group.add_argument(
        "--optiq-adapter",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="Mount a LoRA adapter (mlx-lm, optiq or PEFT; local directory or Hugging Face repo id) "
        "under NAME on the resident base model; repeatable. Requests select it with \"model\": NAME "
        "or \"adapters\": NAME, and requests for different adapters share one batch.",
    )
    group.add_argument(
        "--optiq-adapter-root",
        default=None,
        metavar="DIR",
        help="Allow mounting adapters at runtime (POST /v1/adapters, DELETE /v1/adapters/NAME) "
        "from directories inside DIR only.",
    )


def _parse_specs(items, parser):
    specs = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            parser.error(f"--optiq-adapter {item!r}: expected NAME=PATH (PATH a directory or Hugging Face repo id)")
        if name in specs:
            parser.error(f"--optiq-adapter {item!r}: the name {name!r} is given twice")
        if name == "default_model":
            parser.error(f"--optiq-adapter {item!r}: 'default_model' is reserved for the base model")
        specs[name] = path
    return specs


def _base_ids(model_arg):
    ids = {"default_model"}
    if model_arg:
        ids.add(model_arg)
        path = Path(model_arg)
        if path.exists():
            ids.add(str(path.resolve()))
    return ids


def after_parse(args, parser):
    specs = _parse_specs(getattr(args, "optiq_adapter", None), parser)
    root = getattr(args, "optiq_adapter_root", None)
    if not specs and root is None:
        return
    if args.adapter_path is not None:
        parser.error("--optiq-adapter/--optiq-adapter-root cannot be combined with --adapter-path; "
                     "mount that adapter with --optiq-adapter NAME=PATH instead")
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            parser.error(f"--optiq-adapter-root {args.optiq_adapter_root}: not a directory")
        root = root.resolve()
    for name in specs:
        if name in _base_ids(args.model):
            parser.error(f"--optiq-adapter {name}=...: the name collides with the base model id")
    weights = {}
    for name, path in specs.items():
        try:
            weights[name] = adapters.read_adapter(path)
        except adapters.AdapterError as e:
            parser.error(f"--optiq-adapter {name}={path}: {e}")
    _check_against_model(args.model, weights, parser)
    global _STATE
    _STATE = _ServerAdapters(weights, root, _base_ids(args.model))


def _check_against_model(model_arg, weights, parser):
    """Fail at start-up, not in the generation thread, when an adapter does not fit the base."""
    if not weights or not model_arg or not Path(model_arg).is_dir():
        return  # a hub model is validated when the server loads it
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_arg), lazy=True)  # lazy: shapes only, no weights read
    for name, w in weights.items():
        try:
            adapters.mount_adapter(model, name, w)
        except adapters.AdapterError as e:
            parser.error(f"--optiq-adapter {name}={w.source}: {e}")


# ---------------------------------------------------------------------------
# Server-side wrappers (each passes through when no adapter server is configured)


def _provider_load(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    state = _STATE
    if state is not None and instance.model is not None and instance.model is not state.model:
        with state.lock:
            for name, w in state.weights.items():
                if name not in adapters.mounted_adapters(instance.model):
                    adapters.mount_adapter(instance.model, name, w)
            state.model = instance.model
    return result


def _send_json(handler, status, payload):
    handler._set_completion_headers(status)
    handler.end_headers()
    handler.wfile.write(json.dumps(payload).encode())
    handler.wfile.flush()


def _error(handler, status, message, kind, **extra):
    _send_json(handler, status, {"error": {"message": message, "type": kind, "code": status, **extra}})


def _handle_completion(wrapped, instance, args, kwargs):
    state = _STATE
    if state is None:
        return wrapped(*args, **kwargs)
    model_field, adapter_field = instance.requested_model, instance.adapter
    names = state.names()
    if adapter_field is not None:
        if adapter_field not in names:
            return _error(instance, 404, f"unknown adapter {adapter_field!r}; mounted adapters: {names}",
                          "not_found_error", param="adapters", mounted_adapters=names)
        if model_field not in state.base_ids and model_field != adapter_field:
            return _error(instance, 404 if model_field not in names else 400,
                          f"'model' is {model_field!r} but 'adapters' is {adapter_field!r}; mounted adapters: {names}",
                          "not_found_error" if model_field not in names else "invalid_request_error",
                          param="model", mounted_adapters=names)
        name = adapter_field
    elif model_field in names:
        name = model_field
    elif model_field in state.base_ids:
        name = None
    else:
        return _error(instance, 404, f"unknown model or adapter {model_field!r}; mounted adapters: {names}",
                      "not_found_error", param="model", mounted_adapters=names)
    # The response echoes `requested_model`; the queue gets the base (see _response_generate).
    instance.adapter = name
    with state.track(name):
        return wrapped(*args, **kwargs)


def _response_generate(wrapped, instance, args, kwargs):
    """Send an adapter request down the queue as a base-model request carrying the adapter name."""
    if _STATE is not None:
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
    if _STATE is not None:
        gen_args = args[2] if len(args) > 2 else kwargs["args"]
        adapters.ACTIVE_ADAPTER.set(getattr(gen_args, "optiq_adapter", None))
    return wrapped(*args, **kwargs)


def _adapter_model_key(model_key, prompt_cache=None):
    state = _STATE
    if state is None:
        return model_key
    key = getattr(prompt_cache[0], _CACHE_TAG, _UNSET) if prompt_cache else _UNSET
    if key is _UNSET:
        key = state.cache_key(adapters.ACTIVE_ADAPTER.get())
    return model_key if key is None else (model_key, key)


def _fetch_nearest_cache(wrapped, instance, args, kwargs):
    if _STATE is None:
        return wrapped(*args, **kwargs)
    model_key, tokens = args
    return wrapped(_adapter_model_key(model_key), tokens)


def _insert_cache(wrapped, instance, args, kwargs):
    if _STATE is None:
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
    if not adapters.mounted_adapters(instance.model):
        return wrapped(*args, **kwargs)
    name = adapters.ACTIVE_ADAPTER.get()
    if name is not None and name not in adapters.mounted_adapters(instance.model):
        raise adapters.UnknownAdapterError(name, adapters.mounted_adapters(instance.model))
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
    with adapters.adapter_rows(instance.model, names):
        return wrapped(*args, **kwargs)


def _tag(model, cache, name):
    if cache and _STATE is not None and _STATE.model is model:
        setattr(cache[0], _CACHE_TAG, _STATE.cache_key(name))


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
        for uid in (args[0] if args else kwargs["uids"]):
            rows.pop(uid, None)
    return result


# ---------------------------------------------------------------------------
# HTTP: /v1/models and runtime mounting


def _handle_models(wrapped, instance, args, kwargs):
    state = _STATE
    if state is None:
        return wrapped(*args, **kwargs)
    model_arg = instance.response_generator.cli_args.model
    base_id = str(Path(model_arg).resolve()) if Path(model_arg).exists() else model_arg
    data = [{"id": base_id, "object": "model", "created": instance.created, "owned_by": "mlx_lm"}]
    with state.lock:
        for name in state.names():
            w = state.weights[name]
            data.append({"id": name, "object": "model", "created": instance.created, "owned_by": "mlx_lm_optiq",
                         "parent": base_id, "root": w.source, "adapter_format": w.format,
                         "adapter_bytes": w.nbytes})
    _send_json(instance, 200, {"object": "list", "data": data})


def _read_body(handler):
    try:
        length = int(handler.headers.get("Content-Length", "0"))
        body = json.loads(handler.rfile.read(length).decode() or "{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"request body: not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ValueError("request body: expected a JSON object with 'name' and 'path'")
    return body


def _inside_root(root, relative):
    """The adapter directory `relative` resolved inside `root`, or None when it escapes."""
    if Path(relative).is_absolute() or relative.startswith("~"):
        return None
    resolved = (root / relative).resolve()  # follows symlinks, collapses '..'
    if resolved != root and root not in resolved.parents:
        return None
    return resolved


def _mount_request(handler, state):
    try:
        body = _read_body(handler)
    except ValueError as e:
        return _error(handler, 400, str(e), "invalid_request_error")
    name, rel = body.get("name"), body.get("path")
    if not isinstance(name, str) or not name or not isinstance(rel, str) or not rel:
        return _error(handler, 400, "request body: 'name' and 'path' must be non-empty strings", "invalid_request_error")
    if name in state.base_ids:
        return _error(handler, 400, f"adapter name {name!r} collides with the base model id", "invalid_request_error")
    path = _inside_root(state.root, rel)
    if path is None:
        return _error(handler, 403, f"path {rel!r} resolves outside the adapter root", "permission_error")
    if not path.is_dir():
        return _error(handler, 400, f"path {rel!r}: no such adapter directory under the adapter root",
                      "invalid_request_error")
    try:
        weights = adapters.read_adapter(path)
    except adapters.AdapterError as e:
        return _error(handler, 400, str(e).replace(str(state.root), "<adapter-root>"), "invalid_request_error")
    with state.lock:
        if name in state.weights:
            return _error(handler, 409, f"adapter {name!r} is already mounted", "conflict_error")
        if state.model is not None:
            try:
                adapters.mount_adapter(state.model, name, weights)
            except adapters.AdapterError as e:
                return _error(handler, 400, str(e).replace(str(state.root), "<adapter-root>"),
                              "invalid_request_error")
        state.weights[name] = weights
    logging.info(f"mlx_lm_optiq: mounted adapter {name!r} from {path}")
    _send_json(handler, 200, {"id": name, "object": "model", "mounted": True, "adapter_format": weights.format,
                              "adapter_bytes": weights.nbytes})


def _do_post(wrapped, instance, args, kwargs):
    state = _STATE
    if state is None or instance.path.rstrip("/") != "/v1/adapters":
        return wrapped(*args, **kwargs)
    if state.root is None:
        return _error(instance, 404, "runtime adapter mounting is off; start the server with --optiq-adapter-root DIR",
                      "not_found_error")
    return _mount_request(instance, state)


def _do_delete(handler):
    state = _STATE
    prefix = "/v1/adapters/"
    if state is None or not handler.path.startswith(prefix):
        return _error(handler, 404, "Not Found", "not_found_error")
    if state.root is None:
        return _error(handler, 404, "runtime adapter unmounting is off; start the server with --optiq-adapter-root DIR",
                      "not_found_error")
    name = handler.path[len(prefix):]
    with state.lock:
        if name not in state.weights:
            names = state.names()
            return _error(handler, 404, f"unknown adapter {name!r}; mounted adapters: {names}", "not_found_error",
                          mounted_adapters=names)
        if state.in_flight.get(name):
            return _error(handler, 409, f"adapter {name!r} has {state.in_flight[name]} request(s) in flight",
                          "conflict_error")
        if state.model is not None:
            adapters.unmount_adapter(state.model, name)
        del state.weights[name]
    logging.info(f"mlx_lm_optiq: unmounted adapter {name!r}")
    _send_json(handler, 200, {"id": name, "object": "model", "deleted": True})


def _remove_do_delete(handler_class):
    def reset():
        if handler_class.__dict__.get("do_DELETE") is _do_delete:
            delattr(handler_class, "do_DELETE")

    return reset


def install(server_module):
    generate_module = sys.modules["mlx_lm.generate"]
    cache_module = sys.modules["mlx_lm.models.cache"]
    wrap = _patching.wrap
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
    # APIHandler has no DELETE handler to wrap; add one and take it away on disable().
    handler_class = server_module.APIHandler
    if "do_DELETE" not in handler_class.__dict__:
        handler_class.do_DELETE = _do_delete
        on_reset(_remove_do_delete(handler_class))
