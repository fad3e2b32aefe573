"""The product image's cache key: it must change exactly when something the Dockerfile reads changes,
or a stale image would be imported into the nodes (or every test run would rebuild for nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabmesh.testenv.product_image import context_files, product_key


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for name, text in {"Dockerfile": "ARG BASE\nFROM ${BASE}\n", "pyproject.toml": "[project]\n",
                       "README.md": "fabmesh\n", "fabmesh/__init__.py": "", "fabmesh/cli.py": "x = 1\n",
                       "fabmesh/strongswan/templates/strongswan.conf.j2": "charon {}\n",
                       "tests/test_x.py": "", "fabmesh/__pycache__/cli.cpython-311.pyc": "junk"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_context_is_what_the_dockerfile_copies_without_bytecode(repo: Path) -> None:
    assert [str(p) for p in context_files(repo)] == [
        "Dockerfile", "README.md", "fabmesh/__init__.py", "fabmesh/cli.py",
        "fabmesh/strongswan/templates/strongswan.conf.j2", "pyproject.toml"]


@pytest.mark.parametrize(("path", "changes"), [
    ("fabmesh/cli.py", True), ("Dockerfile", True), ("pyproject.toml", True),
    ("fabmesh/strongswan/templates/strongswan.conf.j2", True), ("fabmesh/new_module.py", True),
    ("tests/test_x.py", False), ("fabmesh/__pycache__/cli.cpython-311.pyc", False),
])
def test_key_changes_exactly_with_the_build_context(repo: Path, path: str, changes: bool) -> None:
    before = product_key(repo)
    assert product_key(repo) == before
    (repo / path).write_text((repo / path).read_text() + "# edited\n" if (repo / path).exists() else "y = 2\n")
    assert (product_key(repo) != before) is changes
