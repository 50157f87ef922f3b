"""Static types: mypy over the core (strict) and the nnU-Net glue (checked), configured by ``mypy.ini``.

mypy does not follow setuptools' editable-install finder, which is what maps ``nnunet_pgl.pretraining`` (and the
other glue packages) onto ``pretraining/`` etc. The test therefore mirrors the installed layout of ``setup.py``
(``package_dir``, ``py_modules``) with symlinks and checks the installed module names, so that the glue's absolute
imports (``from nnunet_pgl.pretraining.config import ...``) resolve to the checked sources.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_layout() -> Tuple[Dict[str, str], List[str]]:
    """``package_dir`` and ``py_modules`` of the ``setup()`` call in ``setup.py``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    return ast.literal_eval(kwargs["package_dir"]), ast.literal_eval(kwargs["py_modules"])


def link_installed_tree(dest: Path) -> Tuple[List[str], Dict[str, str]]:
    """Mirror the installed layout under ``dest`` with symlinks to the sources.

    Returns mypy's targets (``-p``/``-m`` arguments) and, for readable failures, the map from each mirrored folder
    (relative to ``dest``) back to the source folder (relative to the repository).
    """
    package_dir, py_modules = installed_layout()
    back: Dict[str, str] = {}
    for package, src in sorted(package_dir.items()):
        folder = dest.joinpath(*package.split("."))
        folder.mkdir(parents=True)
        for entry in sorted((ROOT / src).iterdir()):
            if entry.name != "__pycache__" and f"{package}.{entry.name}" not in package_dir:
                (folder / entry.name).symlink_to(entry)
        back[folder.relative_to(dest).as_posix() + "/"] = src + "/"
    for module in py_modules:
        (dest / f"{module}.py").symlink_to(ROOT / f"{module}.py")
    top = sorted({p.split(".")[0] for p in package_dir})
    targets = [a for p in top for a in ("-p", p)] + [a for m in py_modules for a in ("-m", m)]
    return targets, back


def run_mypy(src: Path, targets: List[str], request: pytest.FixtureRequest) -> Tuple[int, List[str]]:
    """mypy (config ``mypy.ini``) on ``targets`` of the mirrored tree ``src``: exit status and output lines."""
    # a lasting cache (.pytest_cache/d/mypy) makes a rerun take about a second; without pytest's cache, a fresh one
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = pytest_cache.mkdir("mypy") if pytest_cache is not None else src.parent / "mypy_cache"
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini"),
                           "--cache-dir", str(cache), "--no-color-output", *targets],
                          cwd=src, env=env, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def test_mypy(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The core passes mypy's strict flags, the glue the checks of ``mypy.ini``."""
    targets, back = link_installed_tree(tmp_path / "src")
    rc, lines = run_mypy(tmp_path / "src", targets, request)
    for mirrored, source in sorted(back.items(), key=lambda kv: -len(kv[0])):  # the deepest folder first
        lines = [source + ln[len(mirrored):] if ln.startswith(mirrored) else ln for ln in lines]
    if rc != 0:
        pytest.fail("mypy (config: mypy.ini) reports, paths as in the repository:\n" + "\n".join(lines), pytrace=False)


PROBE = """\
def untyped(x):
    return x


def body():
    n: int = "one"
    return n
"""


def test_mypy_config_is_strict_for_the_core_only(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """``mypy.ini`` as meant: in the core an unannotated function is an error (strict); in the glue it is not, but
    the bodies of unannotated functions are checked, and the glue's imports of installed names resolve."""
    src = tmp_path / "src"
    link_installed_tree(src)
    (src / "nnunet_pgl" / "_probe.py").write_text(PROBE)
    (src / "nnunet_pgl" / "pretraining" / "_probe.py").write_text(
        PROBE + "\n\nfrom nnunet_pgl.pretraining.config import PretrainConfig\n\nc: int = PretrainConfig()\n")
    rc, lines = run_mypy(src, ["-m", "nnunet_pgl._probe", "-m", "nnunet_pgl.pretraining._probe"], request)
    found = {tuple(ln.split(":")[:2]) + (ln.rsplit("[", 1)[-1].rstrip("]"),) for ln in lines if ": error: " in ln}
    assert found == {
        ("nnunet_pgl/_probe.py", "1", "no-untyped-def"),
        ("nnunet_pgl/_probe.py", "5", "no-untyped-def"),
        ("nnunet_pgl/_probe.py", "6", "assignment"),
        ("nnunet_pgl/pretraining/_probe.py", "6", "assignment"),
        ("nnunet_pgl/pretraining/_probe.py", "12", "assignment"),
    }, "\n".join(lines)
    assert rc == 1
