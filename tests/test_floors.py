"""The architecture's rules, checked: imports only go down a floor, and the product packages
hold no test-only code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_imports_only_go_down_a_floor():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def _copy_product(tmp_path: Path) -> None:
    for name in ("db", "trainer", "worker", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)


def test_the_contract_catches_an_upward_import(tmp_path):
    """The check is not vacuous: db importing worker breaks it."""
    _copy_product(tmp_path)
    with open(tmp_path / "db" / "results.py", "a") as fh:
        fh.write("\nfrom worker.settings import Settings  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "db.results -> worker.settings" in result.stdout


def test_the_rooms_contract_catches_an_upward_import(tmp_path):
    """Inside a floor too: the classify room importing the supervisor (ops) breaks it."""
    _copy_product(tmp_path)
    with open(tmp_path / "worker" / "classify" / "broker.py", "a") as fh:
        fh.write("\nfrom worker.ops.supervisor import Supervisor  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "worker.classify.broker -> worker.ops.supervisor" in result.stdout


def test_no_test_helpers_in_the_product():
    product = [p for name in ("db", "trainer", "worker") for p in (ROOT / name).rglob("*.py")]
    assert not [p for p in product if p.stem in ("testing", "fixtures") or "tiny" in p.stem]


def test_modules_and_functions_stay_small():
    """One idea per home: no product module over 450 lines, no function over 60 (migrations,
    which are written once and never edited, aside)."""
    import ast

    too_big = []
    for path in (p for name in ("db", "trainer", "worker") for p in (ROOT / name).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        source = path.read_text()
        if source.count("\n") > 450:
            too_big.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    assert not too_big, "\n".join(too_big)


def test_module_names_are_unique_outside_the_command_line():
    """One name, one idea: a module outside ``worker/cli/`` (where a command's module may share
    its topic's name) is not named like another one."""
    from collections import Counter

    names = Counter(p.name for name in ("db", "trainer", "worker")
                    for p in (ROOT / name).rglob("*.py")
                    if p.name != "__init__.py" and "cli" not in p.parts
                    and "migrations" not in p.parts)
    assert not [name for name, n in names.items() if n > 1]
