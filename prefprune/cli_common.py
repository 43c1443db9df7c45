"""What every command of `prefprune.cli` shares: the option helper, the flattened-section marker and the
general options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import tyro

Flat = tyro.conf.arg(name="")  # a section whose flags carry no prefix


# The help of a setting a saved model folder records (`prefprune.model.carry_settings`).
_FROM_MODEL = "; default: the model folder's value (prefprune.json / tokenizer_config.json), else "


def _opt(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help}, **kw)


@dataclass
class General:
    """Options every command has."""

    debug: bool = _opt("show full tracebacks on errors", default=False)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _opt(
        "verbosity of prefprune's log messages (stderr)", default="INFO"
    )
