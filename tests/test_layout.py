"""The layers of docs/architecture.md §2, held by the imports of every module (read with ast).

Bottom up: `anon_ticket/domain/` (pure; imports no other project module) and `mailboxes/`
(imports no application, actor or supervisor module); `actors/` (none imports supervisors/
or another actor); `supervisors/supervisor.py` (the restart machinery: no application
message or error); `supervisors/tree.py` wires everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("anon_ticket", "mailboxes", "actors", "supervisors", "tests")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (inside functions and `if TYPE_CHECKING:` too), absolute;
    `from a import b` counts as `a` and, when b is a module, `a.b`."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if (ROOT / Path(*base.split("."), f"{alias.name}.py")).exists()
                         or (ROOT / Path(*base.split("."), alias.name)).is_dir())
    return found


def sources(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, package
    return found


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project(name: str) -> bool:
    return within(name, *PROJECT)


def test_the_reader_sees_every_kind_of_import() -> None:
    found = imports(ROOT / "supervisors" / "tree.py")
    assert {"actors.storage", "mailboxes", "anon_ticket.domain.inboxes"} <= found


@pytest.mark.parametrize("path", sources("anon_ticket/domain"), ids=lambda p: p.name)
def test_the_domain_imports_nothing_of_the_project_outside_itself(path: Path) -> None:
    outside = {m for m in imports(path) if project(m) and not within(m, "anon_ticket.domain")}
    assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("path", sources("mailboxes"), ids=lambda p: p.name)
def test_the_mailbox_layer_imports_no_application_actor_or_supervisor(path: Path) -> None:
    outside = {m for m in imports(path) if project(m) and not within(m, "mailboxes")}
    assert not outside, f"mailboxes/{path.name} imports {sorted(outside)}"


# One actor on two databases: PostgreSQL's storage actor is the storage actor's class with
# its database parts replaced (same requests, handlers and statements), not a second actor.
SAME_ACTOR = {"actors.storage_pg": {"actors.storage"}}


@pytest.mark.parametrize("path", sources("actors"), ids=lambda p: p.name)
def test_no_actor_imports_supervisors_or_another_actor(path: Path) -> None:
    own = _module(path)
    same = SAME_ACTOR.get(own, set())
    wrong = {m for m in imports(path)
             if within(m, "supervisors")
             or (within(m, "actors") and m not in (own, "actors") and m not in same)}
    assert not wrong, f"actors/{path.name} imports {sorted(wrong)}"


def test_the_restart_machinery_imports_no_application_message_or_error() -> None:
    found = imports(ROOT / "supervisors" / "supervisor.py")
    wrong = {m for m in found
             if within(m, "anon_ticket.domain", "anon_ticket.errors", "actors")}
    assert not wrong, f"supervisors/supervisor.py imports {sorted(wrong)}"
