"""Where nnU-Net finds this project's trainers: the shim folder that ``nnUNet_extTrainer`` points to.

An interpreter-start hook (``nnunet_pgl_ext.pth`` → the top-level module ``nnunet_pgl_ext``) sets the variable in
every Python process of the environment, so stock commands, their subprocesses and DDP ranks see it. ``pgl_env``
prints the plain ``export`` line for environments that skip ``.pth`` hooks (``python -S``, some launchers).
"""
from __future__ import annotations

import os

EXT_ENV = "nnUNet_extTrainer"


def shim_folder() -> str:
    """Absolute path of the folder of shim modules (``nnunet_pgl/trainers/ext``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext")


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with the shim folder added after any folders the user set (kept, not replaced)."""
    cur = os.environ.get(EXT_ENV, "") if current is None else current
    parts = [p for p in cur.split(os.pathsep) if p]
    folder = shim_folder()
    if folder not in parts:
        parts.append(folder)
    return os.pathsep.join(parts)


def ensure_ext_trainer_env() -> None:
    """Set ``nnUNet_extTrainer`` in this process (children and DDP ranks inherit it)."""
    os.environ[EXT_ENV] = ext_trainer_value()


def main() -> None:
    """``pgl_env``: print the export line that makes nnU-Net find nnunet_pgl's trainers."""
    print(f"export {EXT_ENV}={ext_trainer_value()}")


if __name__ == "__main__":
    main()
