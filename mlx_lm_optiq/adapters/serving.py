"""What a multi-adapter server holds: the adapters it serves, the base they are mounted on, requests in flight.

`start_serving(config)` reads every adapter named at start-up and checks it against
the base model, so a bad adapter stops the server before it listens. The server hook
keeps the returned `ServedAdapters` and hands it to the request functions in
`admin_api`; nothing here knows about HTTP handlers or flags.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import load_model

from mlx_lm_optiq.adapters import mounting
from mlx_lm_optiq.adapters.config import AdapterServingConfig
from mlx_lm_optiq.core.config import ConfigError


class ServedAdapters:
    """The adapters a server serves (name -> AdapterWeights), mounted on every base it (re)loads.

    `weights` is the source of truth for which names exist: a reloaded base gets all of
    them mounted (`attach`). `in_flight` counts the requests per adapter name (None: the
    base) so an adapter in use cannot be unmounted. `lock` guards all of it.
    """

    def __init__(
        self, weights: Mapping[str, mounting.AdapterWeights], root: Path | None, base_ids: frozenset[str] | set[str]
    ) -> None:
        self.weights = dict(weights)
        self.root = root
        self.base_ids = frozenset(base_ids)
        self.model: nn.Module | None = None
        self.lock = threading.RLock()
        self.in_flight: dict[str | None, int] = {}

    def names(self) -> list[str]:
        return sorted(self.weights)

    @contextlib.contextmanager
    def track(self, name: str | None) -> Iterator[None]:
        """Count one request for `name` as in flight for the duration of the block."""
        with self.lock:
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight[name] -= 1

    def attach(self, model: nn.Module | None) -> None:
        """Mount every served adapter on `model`, the base the server has just (re)loaded."""
        if model is None or model is self.model:
            return
        with self.lock:
            mounted = mounting.mounted_adapters(model)
            for name, w in self.weights.items():
                if name not in mounted:
                    mounting.mount_adapter(model, name, w)
            self.model = model

    def cache_key(self, name: str | None) -> tuple | None:
        """The prompt-cache identity of adapter `name` on the current base (None: the base)."""
        if name is None or self.model is None:
            return None
        return mounting.adapter_cache_key(self.model, name)


def start_serving(config: AdapterServingConfig) -> ServedAdapters | None:
    """Read and check the adapters `config` names; None when the config serves no adapters.

    A local base model is loaded lazily (shapes only, no weights read) and every adapter
    is mounted on it once, so an adapter that does not fit fails here, at start-up, not
    in the generation thread. A hub model is checked when the server loads it.
    """
    if not config.enabled:
        return None
    weights = {}
    for name, path in config.specs.items():
        try:
            weights[name] = mounting.read_adapter(path)
        except mounting.AdapterError as e:
            raise ConfigError("adapter", f"{name}={path}: {e}") from None
    if weights and config.model and Path(config.model).is_dir():
        model, _ = load_model(Path(config.model), lazy=True)
        for name, w in weights.items():
            try:
                mounting.mount_adapter(model, name, w)
            except mounting.AdapterError as e:
                raise ConfigError("adapter", f"{name}={w.source}: {e}") from None
    return ServedAdapters(weights, config.root, config.base_ids)
