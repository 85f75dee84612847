"""The multi-adapter server's HTTP API as plain functions: plain inputs in, `(status, payload)` out.

    parse_body(raw, max_bytes)                                a request body -> JSON value or an error
    select_adapter(state, requested_model, adapters_field)    what a completion request asks for
    list_models(state, model, created, cached)                GET /v1/models
    get_model(state, model, created, path, cached)            GET /v1/models/ID
    mount(state, body)                                        POST /v1/adapters {"name", "path"}
    unmount(state, path)                                      DELETE /v1/adapters/NAME
    cached_hub_models()                                       what stock lists: mlx models in the HF cache

`state` is the server's `serving.ServedAdapters`. Errors are OpenAI-style payloads
(`{"error": {"message", "type", "code", ...}}`) that name the mounted adapters where
that helps. The server hook only moves bytes between mlx-lm's request handler and
these functions, so all of this is testable without a server. No input makes them
raise: whatever a client sends gets a 4xx that says what was expected.

Names follow one grammar (`config.ADAPTER_NAME_RULE`, a Hugging Face repo id's), checked
at start-up and on mount, and request paths are percent-decoded, so every name that can
be mounted can be selected, listed and deleted. Client input repeated in a message is cut
short (`core.errors.brief`).

Path policy (docs/adapters.md): a runtime mount's path is relative to the adapter root,
or absolute; either way it must resolve (symlinks and `..` followed) inside the root, else
403. A client never sees a server path it did not send: adapter entries in /v1/models carry
no path, and error messages show the root as `<adapter-root>`. The one exception is the
base model's id, which stock mlx-lm itself publishes (the resolved `--model` directory) and
which clients send back as "model".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mlx_lm_optiq.adapters import mounting
from mlx_lm_optiq.adapters.config import (
    ADAPTER_NAME_RULE,
    DEFAULT_MODEL_ID,
    adapter_name_problem,
    base_model_id,
    is_hub_repo_id,
)
from mlx_lm_optiq.adapters.serving import ServedAdapters
from mlx_lm_optiq.core.errors import brief

ADAPTERS_PATH = "/v1/adapters"
MODELS_PATH = "/v1/models"
ROOT_PLACEHOLDER = "<adapter-root>"
# A mount body is {"name", "path"}: a few hundred bytes. Anything far larger is refused unread.
MAX_ADMIN_BODY = 1 << 20
# Deeper JSON than any real request (an OpenAI tool schema is ~20 levels); Python's parser and
# mlx-lm's debug logging recurse, so a deeper body would end in a RecursionError.
MAX_JSON_DEPTH = 200
MAX_PATH_CHARS = 4096
MAX_MESSAGE_CHARS = 2000

Response = tuple[int, dict[str, Any]]
_log = logging.getLogger(__name__)


def error(status: int, message: str, kind: str, **extra: Any) -> Response:
    """An OpenAI-style error payload (the message cut to MAX_MESSAGE_CHARS: it may quote files)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    return status, {"error": {"message": message, "type": kind, "code": status, **extra}}


def is_adapters_path(path: str) -> bool:
    """Whether a POST to `path` is a runtime mount (everything else is mlx-lm's)."""
    return _request_path(path).rstrip("/") == ADAPTERS_PATH


def _request_path(path: str) -> str:
    """The percent-decoded path of a request target (query and fragment dropped)."""
    return unquote(urlsplit(path).path, errors="replace")


# ---------------------------------------------------------------------------
# Request bodies


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than `limit` (iterative: a deep value cannot overflow it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def parse_body(raw: bytes) -> tuple[Any, Response | None]:
    """(the JSON value, None) or (None, a 400 saying what is wrong) for a request body.

    Covers what `json.loads` raises besides JSONDecodeError (bytes that are not UTF-8,
    RecursionError on deep nesting, ValueError on over-long integers) and nesting deeper
    than MAX_JSON_DEPTH, which mlx-lm's handler would hit later.
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, error(400, f"request body: not UTF-8 text ({e.reason} at byte {e.start})", "invalid_request_error")
    except RecursionError:
        return None, error(
            400, f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels", "invalid_request_error"
        )
    except ValueError as e:  # JSONDecodeError, or an integer longer than Python converts
        return None, error(400, f"request body: not valid JSON ({brief(str(e), 200)})", "invalid_request_error")
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        return None, error(
            400, f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels", "invalid_request_error"
        )
    return value, None


def body_not_json(problem: Exception) -> Response:
    """The answer to a request body that does not parse as JSON."""
    return error(400, f"request body: not valid JSON ({brief(str(problem), 200)})", "invalid_request_error")


def content_length_problem(value: str | None, limit: int | None) -> Response | None:
    """A 4xx for a Content-Length header that is missing, not a count, or over `limit`; else None."""
    if value is None:
        return error(411, "Content-Length header is required", "invalid_request_error")
    try:
        n = int(value.strip())
    except ValueError:
        n = -1
    if n < 0:
        return error(
            400, f"Content-Length header is {brief(value)}, expected a non-negative integer", "invalid_request_error"
        )
    if limit is not None and n > limit:
        return error(413, f"request body of {n} bytes; at most {limit} are accepted here", "invalid_request_error")
    return None


# ---------------------------------------------------------------------------
# Completions: which model and adapter a request selects


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # NUL bytes, over-long names
        return False


def _base_id(state: ServedAdapters) -> str:
    """The base model's id as /v1/models shows it (for messages that say what to send)."""
    ids = sorted(state.base_ids - {DEFAULT_MODEL_ID})
    return next((i for i in ids if base_model_id(i) == i), DEFAULT_MODEL_ID)


def select_adapter(state: ServedAdapters, requested_model: str | None, adapters_field: str | None) -> Response:
    """What a completion request selects: (200, {"adapter": name, or None for the base}),
    (200, {"adapter": None, "stock": True}) for a request mlx-lm itself serves, or an error.

    Served here (on the resident base, in the shared batch): `"model": NAME` (vLLM/LoRAX
    convention) or `"adapters": NAME` (mlx-lm's field) for a mounted adapter, and `"model"`
    the base (or absent). Stock forms keep stock semantics (a full model reload, as in
    stock mlx-lm): `"model": <another model path or org/repo id>`, and `"model": <a model>`
    with `"adapters": <an adapter directory>`. A mounted name wins over a path of the same
    spelling. A request mixing the two forms gets 400 naming the form to use.
    """
    names = state.names()
    base = _base_id(state)
    model = DEFAULT_MODEL_ID if requested_model is None else requested_model
    if adapters_field is not None:
        if adapters_field in names:
            if model in state.base_ids or model == adapters_field:
                return 200, {"adapter": adapters_field}
            if model in names:
                return error(
                    400,
                    f"'model' is the adapter {brief(model)} but 'adapters' is {brief(adapters_field)}; "
                    "send one adapter name, in either field",
                    "invalid_request_error",
                    param="model",
                    mounted_adapters=names,
                )
            return error(
                400,
                f"'adapters' is the mounted adapter {adapters_field!r}, which is served on the base model only, "
                f"but 'model' is {brief(model)}; send \"model\": {adapters_field!r} (or the base, {base!r})",
                "invalid_request_error",
                param="model",
                mounted_adapters=names,
            )
        if model in names:
            return error(
                400,
                f"'model' is the mounted adapter {model!r} and 'adapters' is {brief(adapters_field)}; "
                f'send only "model": {model!r}, or load an adapter directory the stock way '
                f'with "model": {base!r} and "adapters": PATH',
                "invalid_request_error",
                param="adapters",
                mounted_adapters=names,
            )
        if not _exists(adapters_field):
            return error(
                404,
                f"unknown adapter {brief(adapters_field)}: not a mounted adapter nor an adapter directory; "
                f"mounted adapters: {names}",
                "not_found_error",
                param="adapters",
                mounted_adapters=names,
            )
        if model == DEFAULT_MODEL_ID:
            return error(
                400,
                f"'adapters' is a directory, not a mounted adapter: to load it the stock way (a full model reload) "
                f'also send "model": {base!r}; to serve it beside the others, mount it (POST {ADAPTERS_PATH})',
                "invalid_request_error",
                param="model",
                mounted_adapters=names,
            )
        return 200, {"adapter": None, "stock": True}
    if model in names:
        return 200, {"adapter": model}
    if model in state.base_ids:
        return 200, {"adapter": None}
    if _exists(model) or is_hub_repo_id(model):
        return 200, {"adapter": None, "stock": True}
    return error(
        404,
        f"unknown model or adapter {brief(model)}; mounted adapters: {names}",
        "not_found_error",
        param="model",
        mounted_adapters=names,
    )


# ---------------------------------------------------------------------------
# /v1/models


def cached_hub_models(cache_dir: str | Path | None = None) -> list[str]:
    """The repo ids stock mlx-lm's /v1/models lists: MLX-looking models in the Hugging Face cache.

    Stock's rule (a model repo whose `main` ref has config.json, model.safetensors.index.json
    and tokenizer_config.json). A missing cache folder means none (stock answers an empty body
    there); an unreadable one is logged and lists none.
    """
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:  # pragma: no cover - mlx-lm depends on huggingface_hub
        return []
    files = {"config.json", "model.safetensors.index.json", "tokenizer_config.json"}
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    except Exception as e:  # a damaged cache must not take /v1/models down
        _log.warning(f"mlx_lm_optiq: /v1/models lists no cached models: the Hugging Face cache is unreadable ({e})")
        return []
    ids = []
    for repo in info.repos:
        if repo.repo_type != "model" or "main" not in repo.refs:
            continue
        if files <= {f.file_path.name for f in repo.refs["main"].files}:
            ids.append(repo.repo_id)
    return sorted(ids)


def _model_objects(state: ServedAdapters, model: str | None, created: int, cached: Iterable[str]) -> list[dict]:
    base_id = base_model_id(model) if model else None
    data = [{"id": base_id, "object": "model", "created": created, "owned_by": "mlx_lm"}] if base_id else []
    with state.lock:
        for name in state.names():
            w = state.weights[name]
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "mlx_lm_optiq",
                    "parent": base_id,
                    "adapter_format": w.format,
                    "adapter_bytes": w.nbytes,
                }
            )
    seen = {m["id"] for m in data}
    for repo_id in cached:
        if repo_id not in seen:
            seen.add(repo_id)
            data.append({"id": repo_id, "object": "model", "created": created, "owned_by": "mlx_lm"})
    return data


def list_models(state: ServedAdapters, model: str | None, created: int, cached: Sequence[str] = ()) -> Response:
    """GET /v1/models: the base (the server's `--model`: `model`), every adapter, then what stock
    lists (`cached`: `cached_hub_models()`); always a valid OpenAI list."""
    return 200, {"object": "list", "data": _model_objects(state, model, created, cached)}


def get_model(
    state: ServedAdapters, model: str | None, created: int, path: str, cached: Sequence[str] = ()
) -> Response:
    """GET /v1/models/ID (`path` the request path, percent-encoded or not): the OpenAI Model object, or 404."""
    model_id = _request_path(path)[len(MODELS_PATH) + 1 :]
    for entry in _model_objects(state, model, created, cached):
        if entry["id"] == model_id:
            return 200, entry
    return error(404, f"unknown model {brief(model_id)}", "not_found_error", param="model")


def models_request(
    state: ServedAdapters, model: str | None, created: int, path: str, cached: Sequence[str]
) -> Response:
    """Any GET under /v1/models: the list, one model, or 404 for a path that is neither."""
    request_path = _request_path(path)
    if request_path.rstrip("/") == MODELS_PATH:
        return list_models(state, model, created, cached)
    if request_path.startswith(MODELS_PATH + "/"):
        return get_model(state, model, created, path, cached)
    return error(404, "Not Found", "not_found_error")


# ---------------------------------------------------------------------------
# Runtime mounting


def _inside_root(root: Path, given: str) -> Path | None:
    """The adapter directory `given` (relative to `root`, or absolute) resolved, or None outside `root`."""
    try:
        resolved = (root / given).resolve()  # an absolute `given` replaces root; follows symlinks, collapses '..'
    except (OSError, RuntimeError, ValueError):  # symlink loops, over-long names
        return None
    if resolved != root and root not in resolved.parents:
        return None
    return resolved


def _hide_root(message: str, root: Path) -> str:
    return message.replace(str(root), ROOT_PLACEHOLDER)


def _runtime_mounting_off() -> Response:
    return error(404, "runtime adapter mounting is off: the server has no adapter root", "not_found_error")


def mount(state: ServedAdapters, body: Any) -> Response:
    """POST /v1/adapters with the parsed JSON `body` {"name", "path"}.

    The adapter is read and checked against the base before anything changes: a
    malformed one gets 400 and leaves the mounted adapters and requests in flight alone.
    """
    root = state.root
    if root is None:
        return _runtime_mounting_off()
    if not isinstance(body, dict):
        return error(400, "request body: expected a JSON object with 'name' and 'path'", "invalid_request_error")
    unknown = sorted(set(body) - {"name", "path"})
    if unknown:
        return error(
            400, f"request body: unknown fields {brief(unknown)}; expected 'name' and 'path'", "invalid_request_error"
        )
    name, given = body.get("name"), body.get("path")
    problem = adapter_name_problem(name)
    if problem:
        return error(400, f"'name': {problem}", "invalid_request_error", param="name")
    if name in state.base_ids:
        return error(400, f"adapter name {name!r} collides with the base model id", "invalid_request_error")
    if not isinstance(given, str) or not given or len(given) > MAX_PATH_CHARS or "\0" in given:
        return error(
            400,
            f"'path': expected a directory path of 1-{MAX_PATH_CHARS} characters without NUL bytes, "
            f"relative to the adapter root (or absolute inside it), got {brief(given)}",
            "invalid_request_error",
            param="path",
        )
    path = _inside_root(root, given)
    if path is None:
        return error(403, f"path {brief(given)} resolves outside the adapter root", "permission_error", param="path")
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        return error(
            400, f"path {brief(given)}: no such adapter directory under the adapter root", "invalid_request_error"
        )
    try:
        weights = mounting.read_adapter(path)
    except mounting.AdapterError as e:
        return error(400, _hide_root(str(e), root), "invalid_request_error")
    with state.lock:
        if name in state.weights:
            return error(409, f"adapter {name!r} is already mounted", "conflict_error")
        try:  # checked against the base (loaded, or its shapes while it loads) before it is served
            state.add(name, weights)
        except mounting.AdapterError as e:
            return error(400, _hide_root(str(e), root), "invalid_request_error")
    _log.info(f"mlx_lm_optiq: mounted adapter {name!r} from {path}")
    return 200, {
        "id": name,
        "object": "model",
        "mounted": True,
        "adapter_format": weights.format,
        "adapter_bytes": weights.nbytes,
    }


def unmount(state: ServedAdapters, path: str) -> Response:
    """DELETE /v1/adapters/NAME (`path` the request path, percent-decoded here); 409 while NAME is in use."""
    prefix = ADAPTERS_PATH + "/"
    request_path = _request_path(path)
    if not request_path.startswith(prefix):
        return error(404, "Not Found", "not_found_error")
    if state.root is None:
        return _runtime_mounting_off()
    name = request_path[len(prefix) :]
    with state.lock:
        if name not in state.weights:
            names = state.names()
            hint = f" (names are {ADAPTER_NAME_RULE})" if adapter_name_problem(name) else ""
            return error(
                404,
                f"unknown adapter {brief(name)}{hint}; mounted adapters: {names}",
                "not_found_error",
                mounted_adapters=names,
            )
        # in flight = rows in the batch (or queued) for it; rows just finishing get a moment to leave
        try:
            busy = state.remove(name)
        except mounting.UnknownAdapterError:  # another DELETE removed it while this one waited
            return error(404, f"unknown adapter {name!r}; mounted adapters: {state.names()}", "not_found_error")
        if busy:
            return error(409, f"adapter {name!r} has {busy} request(s) in flight", "conflict_error")
    _log.info(f"mlx_lm_optiq: unmounted adapter {name!r}")
    return 200, {"id": name, "object": "model", "deleted": True}
