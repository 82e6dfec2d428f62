"""User code named in the config as ``package.module:Attr`` (``reward.kind``,
``reward.alignment``, ``reward.reconstructor``).

One loader for all three, so that a bad path fails with the same one-line message in the
driver's config check (``learner.config.validate``, before any actor starts) as in an actor.
"""

from __future__ import annotations

import importlib
from typing import Any


class ImportPathError(ValueError):
    """An import path that does not resolve; the message names the key and the fix."""


def load_import_path(path: str, key: str) -> Any:
    """``package.module:Attr`` -> the callable it names, or an ImportPathError naming ``key``."""
    module_name, colon, attr = path.partition(":")
    if not (colon and module_name and attr):
        raise ImportPathError(f"{key}={path!r} is not an import path: write it as package.module:Attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportPathError(f"{key}={path}: cannot import {module_name!r} ({err}); give a module on the "
                              "Python path (the working directory or an installed package)") from None
    except Exception as err:  # the user's module itself fails while it is imported
        raise ImportPathError(f"{key}={path}: importing {module_name!r} failed with "
                              f"{type(err).__name__}: {err}; fix that module") from None
    target = getattr(module, attr, None)
    if target is None:
        raise ImportPathError(f"{key}={path}: module {module_name!r} has no attribute {attr!r}; "
                              "check the name after the colon")
    if not callable(target):
        raise ImportPathError(f"{key}={path}: {attr!r} is a {type(target).__name__}, not a function or class")
    return target
