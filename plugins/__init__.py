"""Plug-ins: registries of named parts, import paths, and the plug-in modules that fill them.

The bottom layer (it imports nothing of the project).  Reconstructors, reward functions,
alignment evaluators, held-out grid sources and logging sinks are each one
:class:`Registry`: a name maps to a builder (a callable, or an import path
``package.module:Attr`` imported only when the name is first built).  A config value is
a registered name or an import path; the same one-line messages come from the driver's
config check (``learner.config.validate``, before any actor starts) and from an actor.

A plug-in is a module that registers names when it is imported.  The run names its
plug-ins in ``run.plugins`` (default ``[minicarve.plugin]``: MiniCarve's LRM ``lrm``, its
alignment evaluator ``minicarve`` and its ``ground-truth`` renders), and every process
that resolves a name loads them first (:func:`load_plugins`), so no core package ever
imports a world such as MiniCarve.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable


class ImportPathError(ValueError):
    """An import path that does not resolve; the message names the key and the fix."""


def _import_module(module_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ImportPathError(f"{what}: cannot import {module_name!r} ({err}); give a module on the "
                              "Python path (the working directory or an installed package)") from None
    except Exception as err:  # the user's module itself fails while it is imported
        raise ImportPathError(f"{what}: importing {module_name!r} failed with "
                              f"{type(err).__name__}: {err}; fix that module") from None


def load_import_path(path: str, key: str) -> Any:
    """``package.module:Attr`` -> the callable it names, or an ImportPathError naming ``key``."""
    module_name, colon, attr = path.partition(":")
    if not (colon and module_name and attr):
        raise ImportPathError(f"{key}={path!r} is not an import path: write it as package.module:Attr")
    module = _import_module(module_name, f"{key}={path}")
    target = getattr(module, attr, None)
    if target is None:
        raise ImportPathError(f"{key}={path}: module {module_name!r} has no attribute {attr!r}; "
                              "check the name after the colon")
    if not callable(target):
        raise ImportPathError(f"{key}={path}: {attr!r} is a {type(target).__name__}, not a function or class")
    return target


LOADED_PLUGINS: list[str] = []


def load_plugins(modules: Iterable[str], key: str = "run.plugins") -> None:
    """Import each plug-in module once (it registers its names); an ImportPathError naming ``key``."""
    for module in modules:
        if module not in LOADED_PLUGINS:
            _import_module(module, f"{key}: plug-in {module}")
            LOADED_PLUGINS.append(module)


class Registry:
    """Names of one kind of part (``what``), set by the config key ``key``.

    ``register(name, builder, **extras)``: ``builder`` is a callable or an import path string
    (loaded on first use); ``extras`` are facts or hooks about the entry (``extra``, ``hook``).
    ``get(name)``: a registered name's builder, or for ``package.module:Attr`` that attribute;
    what the caller does with it (call it with options, or use it as is) is the registry's
    convention, stated where it is defined.
    """

    def __init__(self, what: str, key: str) -> None:
        self.what, self.key = what, key
        self._entries: dict[str, tuple[Callable | str, dict]] = {}

    def register(self, name: str, builder: Callable | str | None = None, **extras: Any):
        """Register ``builder`` under ``name`` (also usable as a decorator: ``@REG.register("x")``).
        Registering a name again replaces it (a plug-in may override a built-in)."""
        if ":" in name:
            raise ValueError(f"a registered {self.what} name cannot contain ':' (that means an import path): {name!r}")
        if builder is None:
            def decorate(target: Callable) -> Callable:
                self._entries[name] = (target, extras)
                return target
            return decorate
        self._entries[name] = (builder, extras)
        return builder

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _load(self, name: str, target: Callable | str) -> Callable:
        return load_import_path(target, f"{self.key}={name} (registered as)") if isinstance(target, str) else target

    def unknown(self, name: str) -> str:
        plugins = ", ".join(LOADED_PLUGINS) or "none"
        return (f"{self.key} must be one of {', '.join(self.names())} or an import path package.module:Attr "
                f"(got {name!r}; the names come from the built-ins and the plug-ins loaded, {plugins}: "
                "a plug-in module named in run.plugins registers more)")

    def get(self, name: str) -> Callable:
        """The builder of ``name``: ImportPathError for a bad import path, ValueError for an unknown name."""
        if name in self._entries:
            return self._load(name, self._entries[name][0])
        if ":" in name:
            return load_import_path(name, self.key)
        raise ValueError(self.unknown(name))

    def problem(self, name: str) -> str | None:
        """What is wrong with ``name`` (the message), or None: for the config check."""
        try:
            self.get(name)
        except ValueError as err:  # ImportPathError is a ValueError
            return str(err)
        return None

    def extra(self, name: str, key: str, default: Any = None) -> Any:
        """A fact registered with ``name`` (``default`` for import paths and unknown names)."""
        return self._entries[name][1].get(key, default) if name in self._entries else default

    def hook(self, name: str, key: str) -> Callable | None:
        """A callable registered with ``name`` under ``key`` (an import path is loaded), or None."""
        target = self.extra(name, key)
        return None if target is None else self._load(name, target)
