"""What every feature's typed config shares: one error type that names the field.

Each feature has one config dataclass (PEFT's `LoraConfig` is the model: typed fields,
defaults, help text in the field metadata, validated once in `__post_init__`). The
algorithms speak in field names; the hooks and CLI modules, which know how the user
spelled a field (a command-line flag, a Python keyword, a YAML key), render
`ConfigError` with that spelling through `ConfigError.render`. Inside an error's detail
another field is written in backticks (`target_bpw`) so that it is spelled the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields

from mlx_lm_optiq.core.errors import OptiqError


class ConfigError(OptiqError):
    """A config field holds a value the feature cannot use.

    `field` is the dataclass field name (or several, "a/b"); `detail` says what was
    expected and what was given. `str(e)` is "field: detail".
    """

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{field}: {detail}")

    def render(self, spell: Callable[[str], str], field_spell: Callable[[str], str] | None = None) -> str:
        """The message with each field spelled as the user typed it (e.g. as a flag).

        Inside `detail`, other fields are written in backticks (`target_bpw`); they are
        spelled too, by `field_spell` (default `spell`), which may return the word unchanged
        for backticked text that is not a field.
        """
        detail = spell_fields(self.detail, field_spell or spell)
        return f"{'/'.join(spell(f) for f in self.field.split('/'))}: {detail}"


def spell_fields(text: str, spell: Callable[[str], str]) -> str:
    """`text` with each backticked field (`target_bpw`) spelled as the user typed it (e.g. as a flag):
    messages and notes name config fields once, and each front end (convert flags, Python keywords)
    shows its own spelling."""
    return re.sub(r"`(\w+)`", lambda m: spell(m.group(1)), text)


def field_help(config_cls: type) -> dict[str, str]:
    """{field name: help text} from a config dataclass's field metadata (for argparse)."""
    return {f.name: f.metadata.get("help", "") for f in fields(config_cls)}
