"""Method registry: a method is one file that registers a config dataclass and a class.

    @register_method("rtn", RTNConfig)
    class RTN(Method): ...

The run looks methods up by `cfg.method.name`; it never branches on a method's name.
Quantized layer types register the same way (by `kind`) so checkpoints can be reloaded.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ttvq_bench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ttvq_methods.base import Method
    from ttvq_methods.layers import QuantizedLinear

METHODS: dict[str, tuple[type, type]] = {}  # name -> (Method class, Config dataclass)
LAYERS: dict[str, type] = {}  # kind -> QuantizedLinear subclass

# Modules imported on first lookup so that each registers itself. Adding a method means
# adding its module here (one line) plus its file and its yaml.
_METHOD_MODULES = ("fp16", "rtn", "gptq", "vptq", "ttvq")


def register_method(name: str, config_cls: type):
    def wrap(cls):
        if name in METHODS and METHODS[name][0] is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        cls.Config = config_cls
        METHODS[name] = (cls, config_cls)
        return cls

    return wrap


def register_layer(cls):
    LAYERS[cls.kind] = cls
    return cls


def load_all() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"ttvq_methods.{mod}")


def get_method(name: str) -> tuple[type, type]:
    load_all()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_layer(kind: str) -> type:
    load_all()
    if kind not in LAYERS:
        raise ConfigError(f"checkpoint holds unknown layer kind {kind!r}; known: {', '.join(sorted(LAYERS))}")
    return LAYERS[kind]
