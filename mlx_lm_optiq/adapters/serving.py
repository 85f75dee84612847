"""What a multi-adapter server holds: the adapters it serves, the base they are mounted on, requests in flight.

`start_serving(config)` reads every adapter named at start-up and checks it against
the base model's layer shapes, so a bad adapter stops the server before it listens;
the shapes are kept, so an adapter mounted at runtime is checked the same way even
while the server is still loading its model. The server hook keeps the returned
`ServedAdapters` and hands it to the request functions in `admin_api`; nothing here
knows about HTTP handlers or flags.

Requests in flight are counted by `AdapterLease`s: a request's HTTP handler takes one
when it accepts the request, the generation thread takes it over when it starts the
request, and it is released when the request's batch row leaves the batch (finished,
or dropped after the client went away), not when the handler returns. So an adapter is
unmounted only when no batch row uses it, and a finished request no longer counts by
the time its client reads the end of the response. `BatchRows` is that bookkeeping for
one batch generator.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from mlx_lm_optiq.adapters import mounting
from mlx_lm_optiq.adapters.config import AdapterServingConfig
from mlx_lm_optiq.core.config import ConfigError

_log = logging.getLogger(__name__)

# How long an unmount waits for the rows still using the adapter to leave the batch
# before it answers 409: long enough for a request that has just finished (its single
# serving returns right after the last token), short enough to not hold a client.
UNMOUNT_GRACE_S = 0.5


class AdapterGoneError(RuntimeError):
    """A request's adapter was unmounted (or replaced) while the request was being generated.

    Put on that request's response queue, so its HTTP handler answers with this error;
    the batch and every other request go on.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"adapter {name!r} was unmounted while this request was being generated; the request was stopped"
        )


class AdapterLease:
    """One request's hold on the adapter it selected; while any is held the adapter stays mounted.

    Held by the request's HTTP handler from acceptance until the generation thread
    `take`s it (when it starts the request); after that the generation thread releases
    it when the request's batch row leaves the batch or its single serving ends. If the
    generation thread never starts the request, the handler releases it (`handler_done`).
    `release` is idempotent, so every exit path may call it.
    """

    def __init__(self, state: ServedAdapters, name: str) -> None:
        self.state = state
        self.name = name
        self._lock = threading.Lock()
        self._taken = False
        self._released = False
        self._failed = False
        self._sink: Callable[[BaseException], None] | None = None

    @property
    def released(self) -> bool:
        return self._released

    def bind(self, sink: Callable[[BaseException], None]) -> None:
        """Where `fail` sends an error: the request's response queue (`put`), known once the generation thread has it."""
        self._sink = sink

    def take(self) -> None:
        """The generation thread starts the request: from now on it, not the handler, releases the lease."""
        with self._lock:
            self._taken = True

    def handler_done(self) -> None:
        """The HTTP handler is done: release unless the generation thread took the request over."""
        with self._lock:
            if self._taken:
                return
        self.release()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.state._release(self.name)

    def fail(self, error: BaseException) -> None:
        """Finish the request with `error` (once): its handler raises it instead of reading on."""
        with self._lock:
            if self._failed:
                return
            self._failed = True
            sink = self._sink
        if sink is not None:
            sink(error)


class ServedAdapters:
    """The adapters a server serves (name -> AdapterWeights), mounted on every base it (re)loads.

    `weights` is the source of truth for which names exist: a reloaded base gets all of
    them mounted (`attach`). `shapes` (`mounting.layer_shapes` of the base) is what a new
    adapter is checked against before the model is loaded. `in_flight` counts the held
    `AdapterLease`s per adapter name, so an adapter in use cannot be unmounted. `lock`
    guards all of it.
    """

    def __init__(
        self,
        weights: Mapping[str, mounting.AdapterWeights],
        root: Path | None,
        base_ids: frozenset[str] | set[str],
        shapes: dict | None = None,
    ) -> None:
        self.weights = dict(weights)
        self.root = root
        self.base_ids = frozenset(base_ids)
        self.shapes = shapes
        self.model: nn.Module | None = None
        self.lock = threading.RLock()
        self._idle = threading.Condition(self.lock)
        self.in_flight: dict[str, int] = {}
        self.unmount_grace_s = UNMOUNT_GRACE_S

    def names(self) -> list[str]:
        return sorted(self.weights)

    # -- requests in flight

    def acquire(self, name: str | None) -> AdapterLease | None:
        """A lease on adapter `name` for one request (None for a base request, which needs none).

        Raises UnknownAdapterError when `name` is not served: call it under `lock`
        together with the selection, so an unmount cannot slip in between.
        """
        if name is None:
            return None
        with self.lock:
            if name not in self.weights:
                raise mounting.UnknownAdapterError(name, self.weights)
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
        return AdapterLease(self, name)

    def _release(self, name: str) -> None:
        with self.lock:
            left = self.in_flight.get(name, 0) - 1
            if left > 0:
                self.in_flight[name] = left
            else:
                self.in_flight.pop(name, None)
            self._idle.notify_all()

    @contextlib.contextmanager
    def track(self, name: str | None) -> Iterator[AdapterLease | None]:
        """Hold a lease on `name` for the duration of the block (scripts and tests)."""
        lease = self.acquire(name)
        try:
            yield lease
        finally:
            if lease is not None:
                lease.release()

    # -- mounting

    def add(self, name: str, weights: mounting.AdapterWeights) -> None:
        """Serve `weights` under `name`: checked against the base before anything changes (AdapterError).

        Against the loaded model when there is one, else against the base's shapes read
        at start-up; with neither (a server without a model), refused: an adapter that
        was never checked must not reach the generation thread.
        """
        with self.lock:
            if name in self.weights:
                raise mounting.AdapterError(f"adapter {name!r} is already mounted")
            if self.model is not None:
                mounting.mount_adapter(self.model, name, weights)
            elif self.shapes is not None:
                mounting.check_fits(self.shapes, name, weights)
            else:  # only a ServedAdapters made without start_serving (which requires the base)
                raise mounting.AdapterError(f"adapter {name!r}: there is no base model to check it against")
            self.weights[name] = weights

    def remove(self, name: str, grace_s: float | None = None) -> int:
        """Unmount `name` once no request holds it; returns how many still do (0: unmounted).

        Waits up to `grace_s` (default `unmount_grace_s`) for rows that are leaving the
        batch. UnknownAdapterError when `name` is not served (also when another call
        removed it meanwhile).
        """
        grace_s = self.unmount_grace_s if grace_s is None else grace_s
        with self.lock:
            if name not in self.weights:
                raise mounting.UnknownAdapterError(name, self.weights)
            self._idle.wait_for(lambda: not self.in_flight.get(name), grace_s)
            if name not in self.weights:
                raise mounting.UnknownAdapterError(name, self.weights)
            busy = self.in_flight.get(name, 0)
            if busy:
                return busy
            if self.model is not None and name in mounting.mounted_adapters(self.model):
                mounting.unmount_adapter(self.model, name)
            del self.weights[name]
            return 0

    def attach(self, model: nn.Module | None) -> None:
        """Mount every served adapter on `model`, the base the server has just (re)loaded (None: no base now).

        Every adapter was checked against this base's shapes when it was accepted, so
        none can fail here; if one still does (the model on disk changed), it is
        logged and no longer served, rather than stopping the generation thread.
        """
        if model is self.model:
            return
        with self.lock:
            if model is not None:
                mounted = mounting.mounted_adapters(model)
                for name, w in list(self.weights.items()):
                    if name in mounted:
                        continue
                    try:
                        mounting.mount_adapter(model, name, w)
                    except mounting.AdapterError as e:
                        _log.error(f"mlx_lm_optiq: adapter {name!r} no longer fits the loaded base, not served: {e}")
                        del self.weights[name]
            self.model = model

    def cache_key(self, name: str | None) -> tuple | None:
        """The prompt-cache identity of adapter `name` on the current base (None: the base).

        An adapter that is not mounted gets a key no cache entry has, so a lookup finds
        nothing (the request then fails where its row is made, not here).
        """
        if name is None or self.model is None:
            return None
        try:
            return mounting.adapter_cache_key(self.model, name)
        except mounting.UnknownAdapterError:
            return ("optiq-adapter", name, object())


# ---------------------------------------------------------------------------
# The rows of one batch generator


@dataclass
class _Row:
    name: str | None
    mount: mounting.MountedAdapter | None  # the mount the row started on (None: base, or already gone)
    lease: AdapterLease | None
    gone: bool = False
    # what its prompt cache is keyed by: its mount's serial, or (born without a mount) a key nothing matches
    serial: object = None


class BatchRows:
    """Which adapter each row of one batch generator uses (uid -> the mount it started on) and the lease it holds.

    Rows are added when inserted and leave when finished or removed; leaving releases
    the row's lease. A row whose mount is gone at a forward (`selected`) fails its own
    request (its lease) and runs on as a base row until the server drops it; a row with
    no lease (a script's own batch) raises UnknownAdapterError instead, as `adapter_rows` does.
    """

    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}

    def add(
        self, uid: int, name: str | None, mount: mounting.MountedAdapter | None, lease: AdapterLease | None
    ) -> None:
        row = _Row(name, mount, lease, serial=mount.serial if mount is not None else object())
        self._rows[uid] = row
        if name is not None and mount is None:
            self._gone(row, {})

    def names(self, uids: Sequence[int]) -> list[str | None]:
        out = []
        for uid in uids:
            row = self._rows.get(uid)
            out.append(None if row is None or row.gone else row.name)
        return out

    def cache_key(self, uid: int) -> tuple | None:
        """The prompt-cache identity of the row's adapter mount (what it computed with), None for a base row."""
        row = self._rows.get(uid)
        if row is None or row.name is None:
            return None
        return ("optiq-adapter", row.name, row.serial)

    def leave(self, uids: Sequence[int]) -> None:
        for uid in uids:
            row = self._rows.pop(uid, None)
            if row is not None and row.lease is not None:
                row.lease.release()

    def leave_all(self) -> None:
        self.leave(list(self._rows))

    @contextlib.contextmanager
    def selected(self, model: nn.Module, uids: Sequence[int]) -> Iterator[None]:
        """Run one forward of the rows `uids` with each row's own adapter (`mounting.mounted_rows`)."""
        rows = [self._rows.get(uid) for uid in uids]
        mounts = [row.mount if row is not None and not row.gone else None for row in rows]
        with mounting.mounted_rows(model, mounts) as gone:
            for i in gone:
                self._gone(rows[i], mounting.mounted_adapters(model))
            yield

    def _gone(self, row: _Row, mounted: Mapping[str, object]) -> None:
        row.gone = True
        row.mount = None
        if row.lease is None:
            raise mounting.UnknownAdapterError(row.name, mounted)
        _log.warning(f"mlx_lm_optiq: adapter {row.name!r} was unmounted under a running request; that request fails")
        row.lease.fail(AdapterGoneError(row.name))


# ---------------------------------------------------------------------------
# Start-up


def start_serving(config: AdapterServingConfig) -> ServedAdapters | None:
    """Read and check the adapters `config` names; None when the config serves no adapters.

    The base model is loaded lazily (its config and tensor shapes, no weights read; a
    hub model is downloaded, as the server would do next) and every adapter is checked
    against its layer shapes here, at start-up, not in the generation thread. The shapes
    are kept for adapters mounted at runtime.
    """
    if not config.enabled:
        return None
    field = "adapter" if config.specs else "adapter_root"
    weights = {}
    for name, path in config.specs.items():
        try:
            weights[name] = mounting.read_adapter(path)
        except mounting.AdapterError as e:
            raise ConfigError("adapter", f"{name}={path}: {e}") from None
    if not config.model:  # requests for an adapter run on the server's own model: there is none
        raise ConfigError(field, "serving adapters needs the server's base model: start it with --model")
    shapes = _base_shapes(config.model, field)
    for name, w in weights.items():
        try:
            mounting.check_fits(shapes, name, w)
        except mounting.AdapterError as e:
            raise ConfigError("adapter", f"{name}={w.source}: {e}") from None
    return ServedAdapters(weights, config.root, config.base_ids, shapes)


def _base_shapes(model: str, field: str) -> dict:
    from mlx_lm.utils import load_model

    from mlx_lm_optiq.core.model_tree import resolve_model_path

    try:
        path = resolve_model_path(model)
        base, _ = load_model(Path(path), lazy=True)
    except Exception as e:  # a missing directory, an unreadable config: the server could not start either
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(field, f"cannot read the base model {model} to check adapters against: {reason}") from None
    return mounting.layer_shapes(base)
