"""The boundary of the pure-tensor core: ``nnunet_pgl`` proper imports torch and numpy only, never nnunetv2.

Checked in fresh interpreters, with ``nnunetv2`` blocked in ``sys.modules`` so that any import of it fails.
Only module import matters (``selfcheck.main`` may import more, lazily).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nnunet_pgl

CORE_DIR = Path(nnunet_pgl.__file__).parent
# the glue packages installed as nnunet_pgl.pretraining / nnunet_pgl.trainers live outside this folder
CORE_MODULES = sorted(f"nnunet_pgl.{p.stem}" for p in CORE_DIR.glob("*.py") if p.stem != "__init__")
FORBIDDEN = ("nnunetv2", "SimpleITK", "batchgenerators", "batchgeneratorsv2", "blosc2", "acvl_utils",
             "dynamic_network_architectures", "nibabel")

PROBE = r"""
import json, sys
before = set(sys.modules)
for name in {blocked}:
    sys.modules[name] = None
import importlib
for name in {imports}:
    importlib.import_module(name)
new = sorted(n for n in set(sys.modules) - before if sys.modules[n] is not None)
print(json.dumps(new))
"""


def imported_by(imports: list[str], blocked: tuple[str, ...] = ()) -> list[str]:
    """Modules a fresh interpreter loads to import ``imports`` (with ``blocked`` set to None first)."""
    code = PROBE.format(blocked=list(blocked), imports=imports)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(CORE_DIR.parent))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def top_level_third_party(mods: list[str]) -> set[str]:
    tops = {m.split(".")[0] for m in mods}
    return {t for t in tops if t not in sys.stdlib_module_names and not t.startswith("_")}


def test_core_modules_are_found():
    expected = {"prior", "views", "alignment", "intensity", "losses", "ema", "features", "model"}
    assert expected <= {m.split(".")[1] for m in CORE_MODULES}


def test_core_imports_without_nnunetv2():
    new = imported_by(["nnunet_pgl", *CORE_MODULES], blocked=("nnunetv2",))
    assert "nnunet_pgl" in new and set(CORE_MODULES) <= set(new)
    leaked = sorted(m for m in new if m.split(".")[0] in FORBIDDEN)
    assert leaked == [], leaked
    # the third-party packages the core pulls in are those that torch and numpy pull in themselves
    baseline = top_level_third_party(imported_by(["torch", "numpy"]))
    extra = top_level_third_party(new) - baseline - {"nnunet_pgl"}
    assert extra == set(), f"nnunet_pgl imports third-party modules beyond torch/numpy: {sorted(extra)}"
    assert {"torch"} <= top_level_third_party(new)


def test_nnunetv2_is_really_blocked():
    # the probe's blocking works: importing nnunetv2 with the block in place fails
    code = "import sys; sys.modules['nnunetv2'] = None\ntry:\n    import nnunetv2.paths\nexcept ImportError:\n" \
           "    print('blocked')\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "blocked", res.stderr
