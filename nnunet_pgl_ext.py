"""Interpreter-start hook of nnunet_pgl (run by ``nnunet_pgl_ext.pth`` in site-packages).

Adds the folder of nnunet_pgl's trainer shims to ``nnUNet_extTrainer`` so that stock ``nnUNetv2_train -tr
nnUNetTrainerPGL``, ``nnUNetv2_predict`` and DDP ranks find the trainers. Folders the user already set are kept
(ours is appended). Imports nothing but ``os``; set ``NNUNET_PGL_NO_ENV_HOOK=1`` to disable it.
"""
import os


def shim_folder() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "nnunet_pgl", "trainers", "ext"),  # installed wheel: site-packages
                 os.path.join(here, "trainers", "ext")):              # editable install: the source checkout
        if os.path.isfile(os.path.join(cand, "nnunet_pgl_trainers.py")):
            return cand
    return ""


def apply() -> None:
    if os.environ.get("NNUNET_PGL_NO_ENV_HOOK"):
        return
    folder = shim_folder()
    if not folder:
        return
    parts = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(parts + [folder])


apply()
