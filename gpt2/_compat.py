"""Old import paths of names that moved: a module-level __getattr__
(PEP 562) that finds the name at its new home and warns once per name that the old path goes
away in the next release."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old_module: str, new: str | dict[str, str]) -> Callable[[str], Any]:
    """__getattr__ for old_module: every name now lives in module `new`, or by name in
    {old name: "module:new name"}."""

    def __getattr__(name: str) -> Any:
        if isinstance(new, str):
            module, new_name = new, name
        elif name in new:
            module, new_name = new[name].split(":")
        else:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(module), new_name)
        except AttributeError:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}") from None
        warnings.warn(
            f"{old_module}.{name} moved to {module}.{new_name}; the old path goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
