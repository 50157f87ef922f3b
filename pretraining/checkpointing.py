"""The pretrainer's checkpoints: what they hold (the U-Net's ``network_weights`` that stock ``-pretrained_weights``
loads, ``pgl_meta`` of :mod:`.contract`, and the state ``--c`` needs), written atomically with host tensors only,
and how ``--c`` resumes from them (levels checked, the newest of final/latest, the schedule joined).

A mixin of :class:`~nnunet_pgl.pretraining.pretrainer.nnUNetPretrainerPGL`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join

from nnunet_pgl import unwrap_network
from nnunet_pgl.pretraining.atomic import atomic_write
from nnunet_pgl.pretraining.contract import FINAL_CHECKPOINT, build_meta
from nnunet_pgl.pretraining.schedule import resume_schedule


if TYPE_CHECKING:  # to the type checker, the mixin is the nnU-Net trainer it is mixed into (it uses its attributes)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _Trainer
else:
    _Trainer = object


class ResumeError(ValueError):
    """``--c`` asked for a run that the checkpoint cannot continue (the message says what to pass instead)."""


def _to_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts/lists/tuples of tensors and builtins) with every tensor a compact host copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CheckpointHooks(_Trainer):
    """``save_checkpoint`` / ``load_checkpoint`` of the pretrainer (see the module docstring)."""

    _last_checkpoint: Optional[Tuple[str, int]]  # (path, epoch) of the newest checkpoint on disk

    def pgl_meta(self) -> Dict[str, Any]:
        """``pgl_meta`` (:func:`~nnunet_pgl.pretraining.contract.build_meta`) of this run."""
        cases = [c.meta() for c in self.pretrain_cases]
        return build_meta(self.plans_manager, self.configuration_name, self.num_input_channels, self.method,
                          self.online.loss_levels, cases)

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return

        init_args = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in self.my_init_kwargs.items()}
        ckpt = {  # host tensors only: the file loads on any machine (a CPU-only one too) without map_location
            "network_weights": _to_cpu(unwrap_network(self.network).state_dict()),
            "pgl_heads": _to_cpu({k: v for k, v in self.online.state_dict().items() if not k.startswith("features.")}),
            "pgl_target": _to_cpu(self.target.state_dict()),
            "optimizer_state": _to_cpu(self.optimizer.state_dict()),  # load_state_dict moves it to the params
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "pgl_log": self.pgl_log,
            "_best_ema": None,
            "current_epoch": self.current_epoch + 1,
            "init_args": init_args,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": None,
            "pgl_meta": self.pgl_meta(),
            "pgl_config": self.pgl_config.to_json(),
            "bad_steps_total": self.bad_steps_total,
        }
        atomic_write(filename, lambda tmp: torch.save(ckpt, tmp))
        self._last_checkpoint = (filename, self.current_epoch + 1)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            filename_or_checkpoint = self._newest_checkpoint(filename_or_checkpoint)
        ckpt = (torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
                if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint)
        if "pgl_target" not in ckpt:
            raise ValueError("this checkpoint was not written by a PGL pretrainer (no 'pgl_target'); --c resumes "
                             "only pgl_pretrain runs")
        saved_levels = (ckpt.get("pgl_meta") or {}).get("levels")
        if saved_levels is not None and [int(v) for v in saved_levels] != list(self.online.loss_levels):
            where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
            raise ResumeError(f"{where} was pretrained with loss levels {list(saved_levels)}, but this run builds "
                              f"levels {list(self.online.loss_levels)}. Resume with --c --levels "
                              f"{' '.join(str(v) for v in saved_levels)}. Other levels make a new run: start it "
                              "without --c under another $nnUNet_results (here it would replace this run's "
                              "checkpoints)")
        unwrap_network(self.network).load_state_dict(ckpt["network_weights"])
        heads = {k: v for k, v in self.online.state_dict().items() if k.startswith("features.")}
        heads.update(ckpt["pgl_heads"])
        self.online.load_state_dict(heads)
        self.target.load_state_dict(ckpt["pgl_target"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.logger.load_checkpoint(ckpt["logging"])
        self.pgl_log = list(ckpt.get("pgl_log", []))
        self.current_epoch = ckpt["current_epoch"]
        self.bad_steps_total = ckpt.get("bad_steps_total", 0)
        if isinstance(filename_or_checkpoint, str):
            self._last_checkpoint = (filename_or_checkpoint, self.current_epoch)
        msg = resume_schedule(self.pgl_config, ckpt.get("pgl_config"), self.current_epoch)
        if msg is not None:
            self.print_to_log_file(msg)

    def _newest_checkpoint(self, path: str) -> str:
        """nnU-Net's ``--c`` prefers ``checkpoint_final.pth`` to ``checkpoint_latest.pth``. When a finished run was
        extended (``--c --epochs N``) and then interrupted, the final one is the finished run and the latest one the
        extension's progress: resume from whichever holds more epochs."""
        latest = join(os.path.dirname(path), "checkpoint_latest.pth")
        if os.path.basename(path) != FINAL_CHECKPOINT or not isfile(latest):
            return path

        def epochs(p: str) -> int:  # mmap: reads the small header, not the weights
            return int(torch.load(p, map_location="cpu", weights_only=False, mmap=True)["current_epoch"])

        e_final, e_latest = epochs(path), epochs(latest)
        if e_latest <= e_final:
            return path
        self.print_to_log_file(f"Resuming from checkpoint_latest.pth (epoch {e_latest}): it is newer than "
                               f"checkpoint_final.pth (epoch {e_final}), the finished run that this run extends")
        return latest
