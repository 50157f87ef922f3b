"""Every trainer the project exports is found by nnU-Net's own trainer search (in-process, no training).

``nnUNetv2_train -tr NAME`` calls ``recursive_find_trainer_class_by_name(NAME)``: it searches nnU-Net's own trainer
package first, then each folder of ``$nnUNet_extTrainer`` with ``recursive_find_python_class(folder, NAME, None,
base_folder=folder, cleanup_imports_from_base_folder=True)``. The project's folder there is the shim folder, whose
modules import the trainer modules' ``__all__``; so ``__all__`` must list every trainer class they define.
"""
from __future__ import annotations

import importlib
import inspect
import os

import pytest

from nnunet_pgl.trainers.discovery import shim_folder

TRAINER_MODULES = ("nnunet_pgl.trainers.pgl", "nnunet_pgl.trainers.fractions", "nnunet_pgl.pretraining.pretrainer")


def defined_trainers(module) -> set:
    """The ``nnUNetTrainer`` subclasses whose class statement is in ``module`` (found with ``inspect``)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return {name for name, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__
            and inspect.getsourcefile(obj) == inspect.getsourcefile(module)}


def exported() -> list:
    """``(module, class name)`` of every name in the trainer modules' ``__all__``."""
    out = []
    for mod_name in TRAINER_MODULES:
        mod = importlib.import_module(mod_name)
        out += [(mod, name) for name in mod.__all__]
    return out


@pytest.mark.parametrize("mod_name", TRAINER_MODULES)
def test_all_lists_exactly_the_trainers_the_module_defines(mod_name):
    mod = importlib.import_module(mod_name)
    assert len(mod.__all__) == len(set(mod.__all__))
    assert set(mod.__all__) == defined_trainers(mod)
    assert mod.__all__                                               # each module defines trainers


def test_no_trainer_name_is_exported_twice():
    names = [name for _, name in exported()]
    assert len(names) == len(set(names))


def test_nnunet_finds_every_exported_trainer_in_the_shim_folder():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = shim_folder()
    assert os.path.isdir(folder)
    for mod, name in exported():
        found = recursive_find_python_class(folder, name, None, base_folder=folder,
                                            cleanup_imports_from_base_folder=True)
        assert found is getattr(mod, name), name                     # the class itself, not a copy


def test_stock_search_resolves_every_trainer_to_ours(monkeypatch):
    # the whole lookup of nnUNetv2_train: no stock trainer shadows one of ours, and ours is found through the
    # variable (set here to the shim folder only)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", shim_folder())
    for mod, name in exported():
        assert recursive_find_trainer_class_by_name(name) is getattr(mod, name), name


def test_the_shim_folder_defines_no_classes():
    # the shims only re-export (a class defined there would be a second copy, lost by nnU-Net's import cleanup)
    import ast

    for f in sorted(os.listdir(shim_folder())):
        if f.endswith(".py"):
            tree = ast.parse(open(os.path.join(shim_folder(), f)).read())
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)], f
