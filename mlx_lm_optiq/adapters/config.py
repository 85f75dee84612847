"""The multi-adapter server's settings: which adapters to mount at start-up, where runtime mounts may come from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.config import ConfigError
from mlx_lm_optiq.core.errors import brief

# The id mlx-lm's server gives the model it was started with; never an adapter name.
DEFAULT_MODEL_ID = "default_model"

# Adapter names: the grammar of a Hugging Face repo id (what vLLM/LoRAX clients already send
# as "model"), ASCII only: letters, digits, '-', '_', '.', at most one '/', each part starting
# and ending with a letter, digit or '_', no '..' or '--', at most 96 characters. Such a name
# needs no escaping in a URL path, a log line or a JSON string, so the name a client mounts is
# the name it can select, list and DELETE.
ADAPTER_NAME_MAX = 96
_NAME_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_ADAPTER_NAME = re.compile(rf"{_NAME_PART}(?:/{_NAME_PART})?")
ADAPTER_NAME_RULE = (
    f"1-{ADAPTER_NAME_MAX} characters: letters, digits, '-', '_', '.' and at most one '/' "
    "(like a Hugging Face repo id), each part starting and ending with a letter, digit or '_', "
    "no '..' or '--'"
)


def is_hub_repo_id(value: str) -> bool:
    """Whether `value` is an `org/name` Hugging Face repo id (each part in the grammar above, up to 96 characters)."""
    parts = value.split("/")
    return (
        len(parts) == 2
        and all(len(p) <= ADAPTER_NAME_MAX and re.fullmatch(_NAME_PART, p) for p in parts)
        and ".." not in value
        and "--" not in value
    )


def adapter_name_problem(name: Any) -> str | None:
    """Why `name` is not a valid adapter name (None when it is): see ADAPTER_NAME_RULE."""
    if not isinstance(name, str):
        return f"adapter name {brief(name)}: expected a string"
    if len(name) > ADAPTER_NAME_MAX or not _ADAPTER_NAME.fullmatch(name) or ".." in name or "--" in name:
        return f"adapter name {brief(name)}: expected {ADAPTER_NAME_RULE}"
    if name == DEFAULT_MODEL_ID:
        return f"adapter name {name!r} is reserved for the base model"
    return None


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
            if not isinstance(item, str):
                raise ConfigError("adapter", f"{brief(item)}: expected a string NAME=PATH")
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path or "\0" in path:
                raise ConfigError(
                    "adapter", f"{brief(item)}: expected NAME=PATH (PATH a directory or Hugging Face repo id)"
                )
            if name in self.specs:
                raise ConfigError("adapter", f"{brief(item)}: the name {name!r} is given twice")
            if name == DEFAULT_MODEL_ID:
                raise ConfigError("adapter", f"{brief(item)}: {DEFAULT_MODEL_ID!r} is reserved for the base model")
            problem = adapter_name_problem(name)
            if problem:
                raise ConfigError("adapter", f"{brief(item)}: {problem}")
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
            if "\0" in str(root) or not root.is_dir():
                raise ConfigError("adapter_root", f"{self.adapter_root}: not a directory")
            self.root = root.resolve()

    @property
    def enabled(self) -> bool:
        """Whether the server serves adapters at all (some mounted at start-up, or runtime mounting on)."""
        return bool(self.specs) or self.root is not None
