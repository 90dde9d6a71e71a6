"""Closed choices in configs are enums of this kind: Hydra rejects any other value while it
composes the config (one line naming the key and the allowed values), and the value behaves as
the plain string it names everywhere else (comparisons, dict keys, JSON, f-strings)."""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    # Member names equal their values: OmegaConf parses a choice by member name.
    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]
