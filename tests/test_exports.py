"""Pin the public surface of each module, as httpx does: a change here is an API change."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "sidecar.bridge",
    "sidecar.cache",
    "sidecar.config",
    "sidecar.coordination",
    "sidecar.errors",
    "sidecar.events",
    "sidecar.http_api",
    "sidecar.metrics",
    "sidecar.origins",
    "sidecar.reads",
    "sidecar.service",
    "sidecar.singleflight",
    "sidecar.stats",
    "sidecar.writes",
    "sidecar.app",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_declared_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list) and module.__all__
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.__all__ names missing {symbol}"


def test_only_the_coordination_package_imports_kazoo() -> None:
    import pathlib

    root = pathlib.Path(importlib.import_module("sidecar").__file__).parent  # type: ignore[arg-type]
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "import kazoo" in p.read_text() or "from kazoo" in p.read_text()
        if "coordination" not in p.parts and p.name != "bridge.py"
    ]
    assert offenders == []


def test_every_error_has_a_status_and_problem_type() -> None:
    from sidecar import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SidecarError)
        assert 400 <= cls.status < 600 and cls.problem and cls.title


def test_readme_documents_every_setting() -> None:
    import pathlib

    from sidecar.config import settings_help

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    missing = [env for _, env, _, _ in settings_help() if f"`{env}`" not in readme]
    assert missing == [], f"README's configuration table lacks {missing}"
