"""The multi-adapter server's HTTP API as plain functions: plain inputs in, `(status, payload)` out.

    select_adapter(state, requested_model, adapters_field)   which adapter a completion request wants
    list_models(state, model, created)                       GET /v1/models
    mount(state, body)                                       POST /v1/adapters {"name", "path"}
    unmount(state, path)                                     DELETE /v1/adapters/NAME

`state` is the server's `serving.ServedAdapters`. Errors are OpenAI-style payloads
(`{"error": {"message", "type", "code", ...}}`) that name the mounted adapters where
that helps. The server hook only moves bytes between mlx-lm's request handler and
these functions, so all of this is testable without a server.

Runtime mounting is confined to the adapter root: absolute paths, `~`, `..` and
symlinks that leave it get 403, and error messages show the root as `<adapter-root>`
(a client never learns the server's directory layout).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlx_lm_optiq.adapters import mounting
from mlx_lm_optiq.adapters.config import base_model_id
from mlx_lm_optiq.adapters.serving import ServedAdapters

ADAPTERS_PATH = "/v1/adapters"

Response = tuple[int, dict[str, Any]]


def error(status: int, message: str, kind: str, **extra: Any) -> Response:
    """An OpenAI-style error payload."""
    return status, {"error": {"message": message, "type": kind, "code": status, **extra}}


def is_adapters_path(path: str) -> bool:
    """Whether a POST to `path` is a runtime mount (everything else is mlx-lm's)."""
    return path.rstrip("/") == ADAPTERS_PATH


def select_adapter(state: ServedAdapters, requested_model: str | None, adapters_field: str | None) -> Response:
    """The adapter a completion request selects: (200, {"adapter": name or None for the base}) or an error.

    `"model": NAME` (vLLM/LoRAX convention) or `"adapters": NAME` (mlx-lm's field) select
    an adapter; with both, "model" must be the base or that same adapter.
    """
    names = state.names()
    if adapters_field is not None:
        if adapters_field not in names:
            return error(
                404,
                f"unknown adapter {adapters_field!r}; mounted adapters: {names}",
                "not_found_error",
                param="adapters",
                mounted_adapters=names,
            )
        if requested_model not in state.base_ids and requested_model != adapters_field:
            known = requested_model in names
            return error(
                400 if known else 404,
                f"'model' is {requested_model!r} but 'adapters' is {adapters_field!r}; mounted adapters: {names}",
                "invalid_request_error" if known else "not_found_error",
                param="model",
                mounted_adapters=names,
            )
        return 200, {"adapter": adapters_field}
    if requested_model in names:
        return 200, {"adapter": requested_model}
    if requested_model in state.base_ids:
        return 200, {"adapter": None}
    return error(
        404,
        f"unknown model or adapter {requested_model!r}; mounted adapters: {names}",
        "not_found_error",
        param="model",
        mounted_adapters=names,
    )


def list_models(state: ServedAdapters, model: str, created: int) -> Response:
    """GET /v1/models: the base model (the server's `--model` as given: `model`), then every adapter."""
    base_id = base_model_id(model)
    data = [{"id": base_id, "object": "model", "created": created, "owned_by": "mlx_lm"}]
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
                    "root": w.source,
                    "adapter_format": w.format,
                    "adapter_bytes": w.nbytes,
                }
            )
    return 200, {"object": "list", "data": data}


def body_not_json(problem: Exception) -> Response:
    """The answer to a request body that does not parse as JSON."""
    return error(400, f"request body: not valid JSON ({problem})", "invalid_request_error")


def _inside_root(root: Path, relative: str) -> Path | None:
    """The adapter directory `relative` resolved inside `root`, or None when it escapes."""
    if Path(relative).is_absolute() or relative.startswith("~"):
        return None
    resolved = (root / relative).resolve()  # follows symlinks, collapses '..'
    if resolved != root and root not in resolved.parents:
        return None
    return resolved


def _runtime_mounting_off() -> Response:
    return error(404, "runtime adapter mounting is off: the server has no adapter root", "not_found_error")


def mount(state: ServedAdapters, body: Any) -> Response:
    """POST /v1/adapters with the parsed JSON `body` {"name", "path" relative to the adapter root}.

    The adapter is read and checked against the base before anything changes: a
    malformed one gets 400 and leaves the mounted adapters and requests in flight alone.
    """
    root = state.root
    if root is None:
        return _runtime_mounting_off()
    if not isinstance(body, dict):
        return error(400, "request body: expected a JSON object with 'name' and 'path'", "invalid_request_error")
    name, rel = body.get("name"), body.get("path")
    if not isinstance(name, str) or not name or not isinstance(rel, str) or not rel:
        return error(400, "request body: 'name' and 'path' must be non-empty strings", "invalid_request_error")
    if name in state.base_ids:
        return error(400, f"adapter name {name!r} collides with the base model id", "invalid_request_error")
    path = _inside_root(root, rel)
    if path is None:
        return error(403, f"path {rel!r} resolves outside the adapter root", "permission_error")
    if not path.is_dir():
        return error(400, f"path {rel!r}: no such adapter directory under the adapter root", "invalid_request_error")
    try:
        weights = mounting.read_adapter(path)
    except mounting.AdapterError as e:
        return error(400, str(e).replace(str(root), "<adapter-root>"), "invalid_request_error")
    with state.lock:
        if name in state.weights:
            return error(409, f"adapter {name!r} is already mounted", "conflict_error")
        if state.model is not None:
            try:
                mounting.mount_adapter(state.model, name, weights)
            except mounting.AdapterError as e:
                return error(400, str(e).replace(str(root), "<adapter-root>"), "invalid_request_error")
        state.weights[name] = weights
    logging.info(f"mlx_lm_optiq: mounted adapter {name!r} from {path}")
    return 200, {
        "id": name,
        "object": "model",
        "mounted": True,
        "adapter_format": weights.format,
        "adapter_bytes": weights.nbytes,
    }


def unmount(state: ServedAdapters, path: str) -> Response:
    """DELETE /v1/adapters/NAME (`path` is the request path); 409 while requests for NAME are in flight."""
    prefix = ADAPTERS_PATH + "/"
    if not path.startswith(prefix):
        return error(404, "Not Found", "not_found_error")
    if state.root is None:
        return _runtime_mounting_off()
    name = path[len(prefix) :]
    with state.lock:
        if name not in state.weights:
            names = state.names()
            return error(
                404, f"unknown adapter {name!r}; mounted adapters: {names}", "not_found_error", mounted_adapters=names
            )
        if state.in_flight.get(name):
            return error(409, f"adapter {name!r} has {state.in_flight[name]} request(s) in flight", "conflict_error")
        if state.model is not None:
            mounting.unmount_adapter(state.model, name)
        del state.weights[name]
    logging.info(f"mlx_lm_optiq: unmounted adapter {name!r}")
    return 200, {"id": name, "object": "model", "deleted": True}
