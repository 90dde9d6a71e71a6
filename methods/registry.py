"""The method and layer-kind registries, and how method modules are found.

Adding a method is its file in `methods/` (which registers itself with `@METHODS.register`)
plus its yaml in `conf/method/`; nothing else is edited. Every module of this package is
imported on the first lookup. Methods that live outside the package (a research fork, a test)
are imported from the modules named in the environment variable TTVQ_PLUGINS (comma-separated)
and from the `ttvq_bench.plugins` entry-point group of installed packages.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from importlib import metadata

from ttvq_bench.errors import ConfigError
from ttvq_bench.registry import Registry
from ttvq_methods.base import Method
from ttvq_methods.layers import QuantizedLinear

PLUGINS_ENV = "TTVQ_PLUGINS"


def import_method_modules() -> None:
    import ttvq_methods

    for info in pkgutil.walk_packages(ttvq_methods.__path__, "ttvq_methods."):
        importlib.import_module(info.name)
    for name in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {name!r}: {e}") from None
    for ep in metadata.entry_points(group="ttvq_bench.plugins"):
        ep.load()


# Filled by the modules themselves; the base classes check what registers.
METHODS: Registry[type[Method]] = Registry("method", Method, discover=import_method_modules, name_attr="name")
LAYERS: Registry[type[QuantizedLinear]] = Registry("quantized layer kind", QuantizedLinear, discover=import_method_modules)
