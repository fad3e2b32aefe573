"""Every module of the package imports: a name moved between modules fails here, not in a user's --help."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fabmesh

MODULES = sorted(m.name for m in pkgutil.walk_packages(fabmesh.__path__, "fabmesh."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
