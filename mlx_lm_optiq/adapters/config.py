"""The multi-adapter server's settings: which adapters to mount at start-up, where runtime mounts may come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlx_lm_optiq.core.config import ConfigError

# The id mlx-lm's server gives the model it was started with; never an adapter name.
DEFAULT_MODEL_ID = "default_model"


def base_model_id(model: str) -> str:
    """The id /v1/models shows for the base: the resolved directory of a local model, else the repo id."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


@dataclass
class AdapterServingConfig:
    """Validated once in `__post_init__`; errors name the field (`ConfigError`)."""

    adapter: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NAME=PATH: mount the LoRA adapter at PATH (mlx-lm, optiq or PEFT; local directory or "
            "Hugging Face repo id) under NAME on the resident base model. Requests select it with "
            '"model": NAME or "adapters": NAME, and requests for different adapters share one batch.'
        },
    )
    adapter_root: str | Path | None = field(
        default=None,
        metadata={
            "help": "Allow mounting adapters at runtime (POST /v1/adapters, DELETE /v1/adapters/NAME) "
            "from directories inside this directory only."
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "The base model the server loads (adapter names may not collide with it)."}
    )
    # Parsed in __post_init__.
    specs: dict[str, str] = field(init=False)  # name -> adapter path or repo id
    root: Path | None = field(init=False)  # adapter_root resolved
    base_ids: frozenset[str] = field(init=False)  # every id a request may use for the base model

    def __post_init__(self) -> None:
        self.specs = {}
        for item in self.adapter or []:
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError("adapter", f"{item!r}: expected NAME=PATH (PATH a directory or Hugging Face repo id)")
            if name in self.specs:
                raise ConfigError("adapter", f"{item!r}: the name {name!r} is given twice")
            if name == DEFAULT_MODEL_ID:
                raise ConfigError("adapter", f"{item!r}: {DEFAULT_MODEL_ID!r} is reserved for the base model")
            self.specs[name] = path
        ids = {DEFAULT_MODEL_ID}
        if self.model:
            ids.update({self.model, base_model_id(self.model)})
        self.base_ids = frozenset(ids)
        for name in self.specs:
            if name in self.base_ids:
                raise ConfigError("adapter", f"{name}=...: the name collides with the base model id")
        self.root = None
        if self.adapter_root is not None:
            root = Path(self.adapter_root).expanduser()
            if not root.is_dir():
                raise ConfigError("adapter_root", f"{self.adapter_root}: not a directory")
            self.root = root.resolve()

    @property
    def enabled(self) -> bool:
        """Whether the server serves adapters at all (some mounted at start-up, or runtime mounting on)."""
        return bool(self.specs) or self.root is not None
