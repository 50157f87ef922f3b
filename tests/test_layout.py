"""The layout rules of the source folders, checked on their text (AST only, nothing imported):

- no module over 400 lines;
- no function over 80 lines (argument parsing, ``build_parser``, exempt);
- no module uses another project module's private (underscore) names, by import or as a module attribute;
- the pure core ``nnunet_pgl/`` imports no ``nnunetv2`` and none of the glue packages that do, not even lazily
  inside a function (``tests/test_import_boundary.py`` checks what importing the core loads at run time).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it is installed as (setup.py's package_dir)
PACKAGES = {"nnunet_pgl": "nnunet_pgl", "pretraining": "nnunet_pgl.pretraining", "trainers": "nnunet_pgl.trainers",
            "evaluation": "nnunet_pgl.evaluation", "demo": "nnunet_pgl.demo"}
GLUE = tuple(p for p in PACKAGES.values() if p != "nnunet_pgl")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
EXEMPT_FUNCTIONS = {"build_parser"}


def source_files() -> Iterator[Tuple[Path, str, bool]]:
    """``(path, dotted module name, is a package __init__)`` of every module of the source folders."""
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_pkg else parts)])
            yield path, name, is_pkg


FILES = list(source_files())
MODULES = {name for _, name, _ in FILES}
TREES = {name: (path, ast.parse(path.read_text(), filename=str(path)), is_pkg) for path, name, is_pkg in FILES}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_project(module: str) -> bool:
    return module == "nnunet_pgl" or module.startswith("nnunet_pgl.")


def function_lines(node: ast.AST) -> int:
    """A function's length: from its first statement after the docstring to its end, plus its ``def`` line."""
    body = node.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 2


def imported_module(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` statement of ``module`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module if is_pkg else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def module_aliases(module: str, is_pkg: bool, tree: ast.AST) -> Dict[str, str]:
    """Local names bound to project modules by ``import`` statements anywhere in the module."""
    names: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if is_project(a.name):
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = imported_module(module, is_pkg, node)
            for a in node.names:
                if f"{src}.{a.name}" in MODULES:
                    names[a.asname or a.name] = f"{src}.{a.name}"
    return names


def attribute_chain(node: ast.Attribute) -> Optional[List[str]]:
    """``['a', 'b', 'c']`` for ``a.b.c``; None where the chain does not start at a plain name."""
    parts: List[str] = []
    cur: ast.AST = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return None
    return [cur.id, *reversed(parts)]


def private_uses(module: str, is_pkg: bool, tree: ast.AST) -> List[str]:
    """Where ``module`` uses a private name of another project module (``line: what``)."""
    found: List[str] = []
    aliases = module_aliases(module, is_pkg, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = imported_module(module, is_pkg, node)
            if is_project(src) and src != module:
                found += [f"{node.lineno}: from {src} import {a.name}" for a in node.names if is_private(a.name)]
                if any(is_private(p) for p in src.split(".")):
                    found.append(f"{node.lineno}: from {src} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if is_project(a.name) and any(is_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = attribute_chain(node)
            if chain is None or chain[0] not in aliases:
                continue
            owner = aliases[chain[0]]
            for part in chain[1:-1]:                    # the owner must be a module all the way down
                owner = f"{owner}.{part}" if f"{owner}.{part}" in MODULES else ""
                if not owner:
                    break
            if owner and owner != module:
                found.append(f"{node.lineno}: {'.'.join(chain)} ({owner}.{node.attr})")
    return found


def core_imports_of_glue(module: str, is_pkg: bool, tree: ast.AST) -> List[str]:
    """Imports of ``nnunetv2`` or of a glue package, anywhere in a core module (``line: module``)."""
    def forbidden(name: str) -> bool:
        return name.split(".")[0] == "nnunetv2" or any(name == g or name.startswith(g + ".") for g in GLUE)

    bad: List[str] = []
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = imported_module(module, is_pkg, node)
            names = [src, *(f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in MODULES)]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        bad += [f"{node.lineno}: {n}" for n in names if forbidden(n)][:1]
    return bad


# ---------------------------------------------------------------------------------------------------- the checker
def test_the_source_folders_are_found():
    assert all((ROOT / f).is_dir() for f in PACKAGES)
    assert {"nnunet_pgl.views", "nnunet_pgl.pretraining.loader", "nnunet_pgl.trainers.pgl"} <= MODULES
    assert "nnunet_pgl.pretraining" in MODULES                     # an __init__ is its package


def test_the_checker_sees_what_it_should():
    src = ("import nnunet_pgl.pretraining.loader as L\nimport nnunet_pgl\nfrom nnunet_pgl.pretraining import loader\n"
           "from . import loader as l2\nfrom .loader import _hidden, read_region\n"
           "def f(self):\n    '''doc'''\n    L._a; nnunet_pgl.pretraining.loader._b; loader._c; l2._d\n"
           "    self._e; L.__doc__; L.RegionDataset._f; nnunet_pgl._g\n")
    uses = private_uses("nnunet_pgl.pretraining.config", False, ast.parse(src))
    assert sorted(u.split(":")[0] for u in uses) == ["5", "8", "8", "8", "8", "9"], uses
    assert all(s in " ".join(uses) for s in ("_hidden", "._a", "._b", "._c", "._d", "nnunet_pgl._g"))
    assert private_uses("nnunet_pgl.pretraining.loader", False, ast.parse("from .loader import _x\n")) == []
    fn = ast.parse("def f():\n    '''doc\n    more'''\n    a = 1\n    return a\n").body[0]
    assert function_lines(fn) == 3                                  # def line + the two statements
    core = ("import torch\nfrom .views import x\ndef f():\n    import nnunetv2.paths\n"
            "    from nnunet_pgl.pretraining import loader\n    importlib.import_module('nnunetv2.run')\n")
    assert [b.split(":")[0] for b in core_imports_of_glue("nnunet_pgl.x", False, ast.parse(core))] == ["4", "5", "6"]


# ---------------------------------------------------------------------------------------------------- the rules
def test_no_module_is_over_400_lines():
    long = {rel(p): n for p, _, _ in FILES if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
    long = []
    for name, (path, tree, _) in TREES.items():
        for node in ast.walk(tree):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in EXEMPT_FUNCTIONS
                    and (n := function_lines(node)) > MAX_FUNCTION_LINES):
                long.append(f"{rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_uses_another_modules_private_names():
    uses = {rel(path): u for name, (path, tree, is_pkg) in TREES.items() if (u := private_uses(name, is_pkg, tree))}
    assert uses == {}, f"private names used across modules (make them public or move them): {uses}"


def test_the_core_imports_no_nnunetv2_even_lazily():
    bad = {rel(path): b for name, (path, tree, is_pkg) in TREES.items()
           if (name == "nnunet_pgl" or (name.startswith("nnunet_pgl.") and not name.startswith(GLUE)))
           and (b := core_imports_of_glue(name, is_pkg, tree))}
    assert bad == {}, f"the core imports nnunetv2 or the glue: {bad}"
