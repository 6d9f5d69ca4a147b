"""Each room knows only the rooms below it (model ← engine ← harmony/api), checked on the import graph.

Every import statement counts, at module level or inside a function: a lazy import is still a
dependency. `api/` reaches the engine only through its client interface (`engine/client.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ossrun

ROOT = Path(ossrun.__file__).parent

# room → (forbidden module prefixes, allowed exceptions)
RULES = {
    "api": (("ossrun.engine", "ossrun.model", "torch", "llguidance"), ("ossrun.engine.client",)),
    "engine": (("ossrun.harmony", "openai_harmony", "ossrun.api", "tiktoken"), ()),
    "model": (("ossrun.engine", "ossrun.harmony", "ossrun.api", "openai_harmony"), ()),
    "harmony": (("ossrun.api",), ()),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from ossrun.engine import engine`
    return found


def violations(room: str) -> list[str]:
    forbidden, allowed = RULES[room]
    bad = []
    for path in sorted((ROOT / room).rglob("*.py")):
        for module in sorted(imports(path)):
            hit = any(module == f or module.startswith(f + ".") for f in forbidden)
            exempt = any(module == a or module.startswith(a + ".") for a in allowed)
            if hit and not exempt:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {module}")
    return bad


@pytest.mark.parametrize("room", sorted(RULES))
def test_rooms_import_only_the_rooms_below_them(room):
    assert violations(room) == []


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The rules would be vacuous if the walk missed an import form: each of these must be found."""
    room = tmp_path / "ossrun" / "api"
    room.mkdir(parents=True)
    (room / "x.py").write_text("def f():\n    from ossrun.engine import engine\n    import torch\nfrom ..model import lora\n")
    monkeypatch.setattr(__name__ + ".ROOT", tmp_path / "ossrun")
    assert violations("api") == ["ossrun/api/x.py imports ossrun.engine", "ossrun/api/x.py imports ossrun.engine.engine",
                                 "ossrun/api/x.py imports ossrun.model", "ossrun/api/x.py imports ossrun.model.lora",
                                 "ossrun/api/x.py imports torch"]


@pytest.mark.parametrize("client", ["ossrun.engine.async_engine:AsyncEngine", "tests.api_fakes:FakeEngine"])
def test_engine_clients_implement_the_protocol(client):
    """`build_app` takes any `EngineClient`: the real engine and the scripted fake both implement every
    member, with the protocol's parameters (structurally: neither inherits from it)."""
    import importlib
    import inspect

    from ossrun.engine.client import EngineClient

    module, name = client.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert EngineClient not in cls.__mro__
    members = [m for m in vars(EngineClient) if not m.startswith("_")]
    assert {"info", "check", "submit", "abort", "abort_all", "register_adapter", "has_adapter", "stats"} <= set(members)
    for member in members:
        theirs, ours = getattr(cls, member, None), getattr(EngineClient, member)
        assert theirs is not None, f"{name} lacks {member}"
        if isinstance(ours, property):
            assert isinstance(theirs, property), f"{name}.{member} must be a property"
        else:
            assert list(inspect.signature(theirs).parameters) == list(inspect.signature(ours).parameters), member
    assert inspect.isasyncgenfunction(cls.submit)
