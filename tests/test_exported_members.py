"""Every public module says what it exports (as anyio's tests/test_all_attributes.py and httpx's
tests/test_exported_members.py do): ``__all__`` is a tuple, names only what exists, and names
every public class and function the module defines."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import pipeline
import providers


def public_modules() -> list[str]:
    names = []
    for package in (pipeline, providers):
        names.append(package.__name__)
        names.extend(
            info.name
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
            if not any(part.startswith("_") for part in info.name.split("."))
        )
    return sorted(names)


@pytest.mark.parametrize("name", public_modules())
def test_all_is_a_tuple_of_what_the_module_defines(name: str) -> None:
    module: ModuleType = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, tuple), f"{name}.__all__ must be a tuple"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert defined <= set(exported), f"{name} does not export {sorted(defined - set(exported))}"
