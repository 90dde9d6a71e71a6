"""One registry idiom for everything looked up by name: methods, quantized layer kinds, heads,
kernels, model loaders, corpora.

    METHODS = Registry("method", base=Method, discover=import_method_modules)

    @METHODS.register("rtn")
    class RTN(Method): ...

    METHODS.get("rtn")        # the class; an unknown name raises one line:
                              #   "unknown method 'rnt'; known: fp16, gptq, rtn, ..."

`discover` runs once, on the first lookup, so modules that register themselves (every method
file) are imported only when someone asks for a name.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from ttvq_bench.errors import ConfigError, TTVQError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, base: type | None = None, *, error: type[TTVQError] = ConfigError,
                 discover: Callable[[], None] | None = None, name_attr: str | None = None):
        """name_attr: a class attribute that gets the name a class registers under (methods and
        heads know their own name)."""
        self.what = what
        self.name_attr = name_attr
        self.base = base
        self.error = error
        self._discover = discover
        self._discovered = discover is None
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """`@registry.register(name)` on a class or function, or `registry.register(name, obj)`."""

        def add(o: T) -> T:
            if self.base is not None and not (isinstance(o, type) and issubclass(o, self.base)):
                raise TypeError(f"{self.what} {name!r}: {o!r} is not a subclass of {self.base.__name__}")
            old = self._items.get(name)
            if old is not None and _origin(old) != _origin(o):  # a module imported again re-registers
                raise RuntimeError(f"{self.what} {name!r} registered twice ({old!r} and {o!r})")
            self._items[name] = o
            if self.name_attr and isinstance(o, type) and self.name_attr not in vars(o):
                setattr(o, self.name_attr, name)
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _ensure(self) -> None:
        if not self._discovered:
            self._discovered = True  # set first: discovery imports modules that register here
            self._discover()

    def get(self, name: str) -> T:
        self._ensure()
        if name not in self._items:
            raise self.error(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._items)) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._ensure()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: Any) -> bool:
        self._ensure()
        return name in self._items


def _origin(o: Any) -> tuple:
    return (getattr(o, "__module__", None), getattr(o, "__qualname__", id(o)))
