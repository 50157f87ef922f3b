"""Fine-tuning trainers initialised from a PGL checkpoint, and their scratch twins with the identical schedule.

``nnUNetTrainerPGL`` = nnU-Net's default trainer (1000 epochs × 250 iterations, SGD, poly LR) with a linear LR
warm-up, initialised from the PGL checkpoint of the same dataset, plans and configuration. ``nnUNetTrainerScratch``
is the same schedule from random init: compare a PGL variant with the scratch variant of the same suffix.

*Warm-up*: the first 1 % of the epochs (10 of 1000; none for schedules under 50 epochs) ramp the LR linearly up to
nnU-Net's 1e-2, then nnU-Net's poly decay runs over the remaining epochs. The segmentation layers (and, for
``_encoderOnly``, the decoder) start random while the rest is pretrained; at the full LR with momentum 0.99 their
large early gradients would drive big updates through pretrained layers before the heads fit. The scratch twins
warm up the same way so that only the initialisation differs.

Where the checkpoint comes from: ``$nnUNet_pgl_weights`` (a path) if set, else the ``pgl_pretrain`` output
convention ``$nnUNet_results/<Dataset>/<pretrainer>__<plans>__<configuration>/fold_all/checkpoint_final.pth``.
Its ``pgl_meta`` is checked against the current plans in ``__init__``, before nnU-Net creates the output folder;
the weights are loaded after ``initialize()`` on a fresh run only (not with ``--c``, not with ``--val``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join

from nnunetv2.paths import nnUNet_results
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_pgl.features import unwrap_network
from nnunet_pgl.pretraining.meta import plans_meta

WEIGHTS_ENV = "nnUNet_pgl_weights"
#: the pgl_meta fields that must equal the current plans' for the weights to fit and mean the same thing
CHECKED_FIELDS = ("network_class", "architecture_fingerprint", "patch_size", "num_input_channels",
                  "normalization_schemes")


class PGLCheckpointError(RuntimeError):
    """The PGL checkpoint is missing, unreadable or made for other plans; the message says what to run."""


class WarmupPolyLRScheduler(PolyLRScheduler):
    """Linear warm-up over ``warmup_steps`` epochs to ``initial_lr``, then nnU-Net's poly decay over the rest."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, initial_lr, max_steps, exponent)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        w = self.warmup_steps
        if current_step < w:
            lr = self.initial_lr * (current_step + 1) / (w + 1)
        else:
            frac = min(1.0, (current_step - w) / max(1, self.max_steps - w))
            lr = self.initial_lr * (1 - frac) ** self.exponent
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class nnUNetTrainerScratch(nnUNetTrainer):
    """Random init with the PGL trainers' schedule (warm-up + poly): the fair baseline for ``nnUNetTrainerPGL``."""

    num_epochs_override: Optional[int] = None
    iterations_override: Optional[int] = None
    val_iterations_override: Optional[int] = None
    warmup_fraction = 0.01

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.num_epochs_override is not None:
            self.num_epochs = self.num_epochs_override
        if self.iterations_override is not None:
            self.num_iterations_per_epoch = self.iterations_override
        if self.val_iterations_override is not None:
            self.num_val_iterations_per_epoch = self.val_iterations_override

    @property
    def warmup_epochs(self) -> int:
        return int(round(self.warmup_fraction * self.num_epochs)) if self.num_epochs >= 50 else 0

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)


def default_checkpoint_path(plans: dict, configuration: str, pretrainer: str) -> Optional[str]:
    """Where ``pgl_pretrain`` writes the final checkpoint for these plans (None without ``nnUNet_results``)."""
    if not nnUNet_results:
        return None
    return join(nnUNet_results, plans["dataset_name"], f"{pretrainer}__{plans['plans_name']}__{configuration}",
                "fold_all", "checkpoint_final.pth")


def read_pgl_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint (CPU, tensors and builtins only) or raise :class:`PGLCheckpointError` saying why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects, ...
        raise PGLCheckpointError(
            f"cannot read the PGL checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. It is "
            "truncated or not a checkpoint written by pgl_pretrain. Re-run pgl_pretrain (add --c to resume), or set "
            f"{WEIGHTS_ENV} to a complete checkpoint_final.pth") from None


def check_pgl_meta(ckpt: Dict[str, Any], path: str, plans: dict, configuration: str, dataset_json: dict) -> None:
    """Raise :class:`PGLCheckpointError` naming the first field where ``pgl_meta`` differs from these plans."""
    fix = f"pgl_pretrain -d {plans['dataset_name']} -c {configuration} -p {plans['plans_name']}"
    meta = ckpt.get("pgl_meta") if isinstance(ckpt, dict) else None
    if meta is None:
        who = ckpt.get("trainer_name", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise PGLCheckpointError(
            f"{path} is not a PGL checkpoint (no 'pgl_meta'; written by trainer {who}). To start from an nnU-Net "
            f"checkpoint use nnUNetv2_train ... -pretrained_weights with the stock nnUNetTrainer; to pretrain with "
            f"PGL run: {fix}")
    pm = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
    cm = pm.get_configuration(configuration)
    here = plans_meta(pm, configuration, determine_num_input_channels(pm, cm, dataset_json))
    for field in CHECKED_FIELDS:
        if meta.get(field) != here[field]:
            raise PGLCheckpointError(
                f"the PGL checkpoint {path} does not fit these plans: '{field}' is {meta.get(field)!r} in the "
                f"checkpoint (pretrained with plans '{meta.get('plans_identifier')}', configuration "
                f"'{meta.get('configuration')}') but {here[field]!r} here (plans '{plans['plans_name']}', configuration "
                f"'{configuration}'). Pretrain for these plans: {fix} (or point {WEIGHTS_ENV} to a matching checkpoint)")


class nnUNetTrainerPGL(nnUNetTrainerScratch):
    """nnU-Net's default training with a warm-up, initialised from the PGL checkpoint of these plans."""

    pretrainer_name = "nnUNetPretrainerPGL"
    encoder_only = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        fresh = not plans.get("continue_training", False)
        self._pgl_checkpoint: Optional[str] = None
        if fresh:
            self._pgl_checkpoint = self._locate_and_check(plans, configuration, fold, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._pgl_from_checkpoint = False

    def _locate_and_check(self, plans: dict, configuration: str, fold, dataset_json: dict) -> Optional[str]:
        """Find the checkpoint and check its pgl_meta, before nnU-Net creates any output folder."""
        path = os.environ.get(WEIGHTS_ENV) or default_checkpoint_path(plans, configuration, self.pretrainer_name)
        if path is None or not isfile(path):
            own = (join(nnUNet_results, plans["dataset_name"],
                        f"{self.__class__.__name__}__{plans['plans_name']}__{configuration}", f"fold_{fold}")
                   if nnUNet_results else None)
            if own and isfile(join(own, "checkpoint_final.pth")):
                return None  # a finished run (e.g. --val): nothing to initialise, no reason to refuse
            method = {"nnUNetPretrainerBYOL": " --method byol"}.get(self.pretrainer_name, "")
            src = f"{WEIGHTS_ENV}={path}" if os.environ.get(WEIGHTS_ENV) else f"the pgl_pretrain output {path}"
            raise PGLCheckpointError(
                f"{self.__class__.__name__} needs a PGL checkpoint, and {src} does not exist. Run: pgl_pretrain -d "
                f"{plans['dataset_name']} -c {configuration} -p {plans['plans_name']}{method} (or set {WEIGHTS_ENV} "
                "to a checkpoint_final.pth)")
        check_pgl_meta(read_pgl_checkpoint(path), path, plans, configuration, dataset_json)
        return path

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._pgl_from_checkpoint = True  # --c / --val: the run's own checkpoint wins, no PGL init
        super().load_checkpoint(filename_or_checkpoint)

    def initialize(self):
        super().initialize()
        if self._pgl_checkpoint is not None and not self._pgl_from_checkpoint:
            self.load_pgl_weights(self._pgl_checkpoint)

    def load_pgl_weights(self, path: str) -> Tuple[int, int]:
        """Copy the checkpoint's U-Net weights into the (unwrapped) network; log a report; return (loaded, skipped)."""
        weights = read_pgl_checkpoint(path)["network_weights"]
        net = unwrap_network(self.network)
        own = net.state_dict()
        load: Dict[str, torch.Tensor] = {}
        seg, dec = [], []
        for k, v in own.items():
            if ".seg_layers." in k:
                seg.append(k)
            elif self.encoder_only and not (k.startswith("encoder.") or k.startswith("decoder.encoder.")):
                dec.append(k)
            else:
                if k not in weights or tuple(weights[k].shape) != tuple(v.shape):
                    raise PGLCheckpointError(f"{path}: tensor {k} is missing or has another shape "
                                             f"({tuple(weights[k].shape) if k in weights else None} vs {tuple(v.shape)})")
                load[k] = weights[k]
        net.load_state_dict(load, strict=False)
        n_values = sum(t.numel() for k, t in load.items() if not k.startswith("decoder.encoder."))
        self.print_to_log_file(f"PGL initialisation from {path}: loaded {len(load)} tensors ({n_values:,} values)")
        self.print_to_log_file(f"  skipped {len(seg)} segmentation-layer tensors (task-specific: trained from scratch)")
        if dec:
            self.print_to_log_file(f"  skipped {len(dec)} decoder tensors (_encoderOnly: the decoder starts random)")
        return len(load), len(seg) + len(dec)


class nnUNetTrainerPGL_encoderOnly(nnUNetTrainerPGL):
    """Only the encoder from PGL; decoder random (what encoder-only SSL methods transfer). Twin: Scratch."""

    encoder_only = True


class nnUNetTrainerPGLBYOL(nnUNetTrainerPGL):
    """Initialised from the global-consistency baseline (``pgl_pretrain --method byol``). Twin: Scratch."""

    pretrainer_name = "nnUNetPretrainerBYOL"


# ------------------------------------------------------------------------------ schedule variants (and twins)
class nnUNetTrainerPGL_1epochs(nnUNetTrainerPGL):
    num_epochs_override = 1


class nnUNetTrainerScratch_1epochs(nnUNetTrainerScratch):
    num_epochs_override = 1


class nnUNetTrainerPGL_5epochs(nnUNetTrainerPGL):
    num_epochs_override = 5


class nnUNetTrainerScratch_5epochs(nnUNetTrainerScratch):
    num_epochs_override = 5


class nnUNetTrainerPGL_10epochs(nnUNetTrainerPGL):
    num_epochs_override = 10


class nnUNetTrainerScratch_10epochs(nnUNetTrainerScratch):
    num_epochs_override = 10


class nnUNetTrainerPGL_50epochs(nnUNetTrainerPGL):
    num_epochs_override = 50


class nnUNetTrainerScratch_50epochs(nnUNetTrainerScratch):
    num_epochs_override = 50


class nnUNetTrainerPGL_100epochs(nnUNetTrainerPGL):
    num_epochs_override = 100


class nnUNetTrainerScratch_100epochs(nnUNetTrainerScratch):
    num_epochs_override = 100


class nnUNetTrainerPGL_250epochs(nnUNetTrainerPGL):
    num_epochs_override = 250


class nnUNetTrainerScratch_250epochs(nnUNetTrainerScratch):
    num_epochs_override = 250


class nnUNetTrainerPGL_smoke(nnUNetTrainerPGL):
    """CPU tests: 1 epoch of 3 training and 1 validation iterations (plus nnU-Net's final validation)."""

    num_epochs_override, iterations_override, val_iterations_override = 1, 3, 1


class nnUNetTrainerScratch_smoke(nnUNetTrainerScratch):
    """Twin of ``nnUNetTrainerPGL_smoke``."""

    num_epochs_override, iterations_override, val_iterations_override = 1, 3, 1


class nnUNetTrainerPGL_demo(nnUNetTrainerPGL):
    """``pgl_demo`` on CPU: about 3 minutes of fine-tuning on 2 cores (7 epochs of 20 iterations)."""

    num_epochs_override, iterations_override, val_iterations_override = 7, 20, 2


class nnUNetTrainerScratch_demo(nnUNetTrainerScratch):
    """Twin of ``nnUNetTrainerPGL_demo``."""

    num_epochs_override, iterations_override, val_iterations_override = 7, 20, 2
