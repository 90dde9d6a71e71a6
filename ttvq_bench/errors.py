"""Errors the harness reports to the user as one line (no traceback).

Anything raised as a `TTVQError` is a problem with the user's input or config, not a bug:
`__main__` prints `error: <message>` and exits non-zero, and the job gets no ok record.
"""


class TTVQError(Exception):
    """Base class: a clear, user-facing failure."""


class ConfigError(TTVQError):
    """A config value that composes but makes no sense (bits a method cannot do, ...)."""


class DataError(TTVQError):
    """A missing or unusable model or data path, or a corpus too short for the protocol."""


class QuantizationError(TTVQError):
    """A method produced an unusable layer (NaN/Inf weights, wrong shape)."""
