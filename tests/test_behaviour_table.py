"""tests/README.md maps the README's "Behaviour" section to the tests that prove it: every behaviour
has a row, and every test a row names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = (ROOT / "tests" / "README.md").read_text()


def behaviours() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Behaviour\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- \*\*(.+?)\*\*", section, re.M)


def test_every_behaviour_of_the_readme_has_a_row() -> None:
    rows = [line for line in TABLE.splitlines() if line.startswith("| ")]
    assert len(behaviours()) >= 10
    missing = [b for b in behaviours() if not any(f"**{b}**" in row for row in rows)]
    assert not missing, f"behaviours of the README without a row in tests/README.md: {missing}"


def test_every_test_the_table_names_exists() -> None:
    named = re.findall(r"`?((?:g/|tests/)[\w/]+\.py)`?(?:::(\w+))?", TABLE)
    named += [(f"g/{m}", t) for m, t in re.findall(r"`g/(\w+\.py)::(\w+)`", TABLE)]
    # "`::name`" after a module refers to that module.
    for line in TABLE.splitlines():
        module = None
        for ref in re.finditer(r"`(?:(g/|tests/)([\w/]+\.py))?::(\w+)`", line):
            if ref.group(2):
                module = (ref.group(1) or "") + ref.group(2)
            elif module is not None:
                named.append((module, ref.group(3)))
    assert len(named) > 50
    for module, name in named:
        path = ROOT / ("tests/gateway/" + module[2:] if module.startswith("g/") else module)
        assert path.exists(), module
        if name:
            tree = ast.parse(path.read_text())
            functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
            assert name in functions, f"{module}::{name} does not exist"
