"""Name -> class registries, so that configs can name workflows and environments."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import ConfigError
from ..workflow import Workflow

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind (subclasses of ``base``), by name."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, T] = {}

    def register(self, name: str, *, force: bool = False) -> Callable[[T], T]:
        """Class decorator: ``@registry.register("name")``. Another class under a taken name
        raises ValueError unless ``force`` (registering the same class again is a no-op)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty str, got {name!r}")

        def decorate(cls: T) -> T:
            self._check(name, cls)
            taken = self._classes.get(name)
            if taken is not None and taken is not cls and not force:
                raise ValueError(f"{self.kind} name {name!r} is already registered to "
                                 f"{_qualname(taken)} (force=True replaces it)")
            self._classes[name] = cls
            return cls
        return decorate

    def get(self, name: str) -> T:
        """The class registered as ``name``, or, for a dotted name that is not registered,
        the class it imports (``"package.module.Class"``). ConfigError if neither."""
        if not isinstance(name, str):
            raise ConfigError(f"a {self.kind} name must be a str, got {type(name).__name__}")
        cls = self._classes.get(name)
        if cls is not None:
            return cls
        module, _, attr = name.rpartition(".")
        if not module:
            raise ConfigError(f"unknown {self.kind} {name!r} (registered: "
                              f"{', '.join(sorted(self._classes)) or 'none'}; or give the "
                              f"class's import path, package.module.Class)")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.kind} {name!r} is neither registered nor importable: "
                              f"{type(exc).__name__}: {exc}") from None
        try:
            self._check(name, found)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        return found    # type: ignore[no-any-return]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def _check(self, name: str, cls: object) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self.kind} {name!r}: expected a subclass of "
                            f"{self.base.__name__}, got {cls!r}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


WORKFLOWS: Registry[type[Workflow]] = Registry("workflow", Workflow)
