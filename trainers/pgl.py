"""Fine-tuning trainers initialised from a PGL checkpoint, and their scratch twins with the identical schedule.

``nnUNetTrainerPGL`` = nnU-Net's default trainer (1000 epochs × 250 iterations, SGD, poly LR) with a linear LR
warm-up, initialised from the PGL checkpoint of the same dataset, plans and configuration. ``nnUNetTrainerScratch``
is the same schedule from random init: compare a PGL variant with the scratch variant of the same suffix.

*Warm-up*: the first 1 % of the epochs (10 of 1000; none for schedules under 50 epochs) ramp the LR linearly up to
nnU-Net's 1e-2, then nnU-Net's poly decay runs over the remaining epochs. The segmentation layers (and, for
``_encoderOnly``, the decoder) start random while the rest is pretrained; at the full LR with momentum 0.99 their
large early gradients would drive big updates through pretrained layers before the heads fit. The scratch twins
warm up the same way so that only the initialisation differs.

Which checkpoint (:func:`choose_pgl_checkpoint`, first match wins; the training log names it and why):

1. ``$nnUNet_pgl_weights`` (a path), if set: it overrides everything below;
2. ``fold_K``: for fold K, the pretraining for fold K (``pgl_pretrain --exclude-fold K`` or ``--folds``), i.e.
   ``$nnUNet_results/<Dataset>/<pretrainer>__<plans>__<configuration>/fold_K/checkpoint_final.pth``;
3. ``fold_all`` of the same folder: for fold K with a leakage warning in the training log (it was not pretrained
   for fold K; the warning counts fold K's validation cases among its labeled pretraining images);
4. transferred: the record ``$nnUNet_results/<Dataset>/pgl_transfer__<plans>__<configuration>.json`` that
   ``pgl_transfer`` writes names the source dataset and plans; the checkpoint is that dataset's ``fold_all``.

Its ``pgl_meta`` is checked against the current plans in ``__init__``, before nnU-Net creates the output folder:
architecture fields that differ refuse; a different target spacing or CT normalisation (clip bounds, mean, std) is
a warning in the training log. The weights are loaded in ``initialize()`` whenever nnU-Net starts the run fresh:
without ``--c``, and with ``--c`` when the run has no checkpoint yet. When nnU-Net loads the run's own checkpoint
(``--c`` with one, ``--val``) it wins and nothing is loaded from PGL. Where nnU-Net may load the run's own checkpoint,
a missing or unfitting PGL checkpoint is reported only if the run does start fresh. ``initialize()`` is the hook
because nnU-Net's ``maybe_load_checkpoint`` reaches it through ``load_checkpoint`` (which marks the run as resumed
first) whenever it loads a checkpoint, and otherwise ``on_train_start`` calls it after that decision; stock
``-pretrained_weights`` loads right after it and so still overrides the PGL weights.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join

from nnunetv2.paths import nnUNet_results
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_pgl.features import unwrap_network
from nnunet_pgl.pretraining.contract import (FINAL_CHECKPOINT, METHODS, CheckpointChoice, PGLCheckpointError,
                                             check_pgl_meta, choose_pgl_checkpoint, pretrain_command,
                                             read_pgl_checkpoint)

SEED_ENV = "nnUNet_pgl_seed"


def seed_from_env() -> Optional[int]:
    """Seed Python's, NumPy's and PyTorch's generators from ``$nnUNet_pgl_seed`` if it is set (``pgl_demo`` sets it).

    nnU-Net does not seed its training. Seeded before the network is built, the initialisation, the batch draws and
    the augmentation repeat; on CPU with ``nnUNet_n_proc_DA=0`` (augmentation in the training process) a run then
    reproduces exactly. With augmentation workers or on GPU (nondeterministic kernels) runs still differ.

    Returns:
        The seed, or None when the variable is unset.
    """
    value = os.environ.get(SEED_ENV)
    if value is None or value == "":
        return None
    try:
        seed = int(value)
    except ValueError:
        raise ValueError(f"${SEED_ENV}={value!r} is not an integer; unset it or give a whole number") from None
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return seed


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
        self.seed = seed_from_env()  # before anything draws: network init, batches, augmentation
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


class nnUNetTrainerPGL(nnUNetTrainerScratch):
    """nnU-Net's default training with a warm-up, initialised from the PGL checkpoint of these plans."""

    #: the pretraining method whose checkpoint this trainer starts from (:data:`METHODS`)
    pgl_method = "pgl"
    encoder_only = False

    @classmethod
    def pretrainer(cls) -> str:
        """The pretrainer class (and output folder) of :attr:`pgl_method`."""
        return METHODS[cls.pgl_method].pretrainer

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self._pgl_choice: Optional[CheckpointChoice] = None
        self._pgl_error: Optional[PGLCheckpointError] = None
        try:  # before nnU-Net creates the output folder
            self._pgl_choice = self._choose_and_check(plans, configuration, fold, dataset_json)
        except PGLCheckpointError as e:
            if not self._may_load_own_checkpoint(plans, configuration, fold):
                raise
            self._pgl_error = e  # raised in initialize() only if nnU-Net does start this run fresh
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._pgl_from_checkpoint = False

    def _choose_and_check(self, plans: dict, configuration: str, fold, dataset_json: dict) -> CheckpointChoice:
        """Choose the checkpoint (:func:`choose_pgl_checkpoint`) and check its pgl_meta against these plans."""
        choice = choose_pgl_checkpoint(plans, configuration, fold, self.pretrainer(), self.__class__.__name__)
        check_pgl_meta(read_pgl_checkpoint(choice.path), choice.path, plans, configuration, dataset_json,
                       self.pretrainer())
        return choice

    def _may_load_own_checkpoint(self, plans: dict, configuration: str, fold) -> bool:
        """Whether nnU-Net may load this run's own checkpoint instead of starting fresh (nnU-Net's
        ``maybe_load_checkpoint``): with ``--c`` any of final/latest/best; otherwise ``checkpoint_final.pth``, which
        ``--val`` loads (a plain rerun of a finished run starts fresh, and ``initialize()`` then reports the error)."""
        if not nnUNet_results:
            return False
        own = get_output_folder(plans["dataset_name"], self.__class__.__name__, plans["plans_name"], configuration,
                                fold)
        names = ((FINAL_CHECKPOINT, "checkpoint_latest.pth", "checkpoint_best.pth")
                 if plans.get("continue_training", False) else (FINAL_CHECKPOINT,))
        return any(isfile(join(own, n)) for n in names)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._pgl_from_checkpoint = True  # --c / --val: the run's own checkpoint wins, no PGL init
        super().load_checkpoint(filename_or_checkpoint)

    def initialize(self):
        super().initialize()
        if self._pgl_from_checkpoint:
            return
        # nnU-Net starts this run fresh: no --c, or --c without a checkpoint of this run (maybe_load_checkpoint calls
        # load_checkpoint, which initialises, whenever it loads one)
        if self._pgl_error is not None:
            raise self._pgl_error
        assert self._pgl_choice is not None
        path = self._pgl_choice.path
        ckpt = read_pgl_checkpoint(path)
        warnings = check_pgl_meta(ckpt, path, self.plans_manager.plans, self.configuration_name, self.dataset_json,
                                  self.pretrainer())
        self.print_to_log_file(f"PGL checkpoint {path}, chosen: {self._pgl_choice.why}")
        if self._pgl_choice.fallback:
            self.print_to_log_file(f"WARNING: {self._leakage_warning(ckpt.get('pgl_meta') or {})}")
        for w in warnings:
            self.print_to_log_file(f"WARNING: {w}. Fine-tuning adapts to it; to fine-tune with the pretraining's "
                                   "spacing and intensity scaling, preprocess this dataset with its plans "
                                   "(pgl_transfer)")
        self.load_pgl_weights(path, ckpt)

    def _leakage_warning(self, meta: Dict[str, Any]) -> str:
        """Fold K uses ``fold_all``: how many of fold K's validation cases it saw (labeled images, by case id), and
        the command for leakage-free cross-validation."""
        k = self.fold
        pm = self.plans_manager
        fix = (f"{pretrain_command(pm.dataset_name, self.configuration_name, pm.plans_name, self.pretrainer())} "
               "--folds 0 1 2 3 4")
        detail = f"it may have seen fold {k}'s validation images"
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json") \
            if self.preprocessed_dataset_folder_base else None
        if splits_file and isfile(splits_file) and meta.get("dataset_name") in (None, pm.dataset_name):
            with open(splits_file) as f:
                splits = json.load(f)
            if isinstance(k, int) and 0 <= k < len(splits):
                val = set(splits[k]["val"])
                seen = sorted(val & {c.get("case_id") for c in meta.get("cases") or [] if c.get("kind") == "labeled"})
                detail = (f"{len(seen)} of the {len(val)} validation cases of fold {k} are among its labeled "
                          f"pretraining images ({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''})" if seen else
                          f"none of the {len(val)} validation cases of fold {k} is among its labeled pretraining "
                          "images; copies among its unlabeled images are not checked here")
        return (f"leakage: fold {k} is initialised from fold_all, not from a pretraining for fold {k}: {detail}. This "
                f"fold's validation numbers may be optimistic (pgl_compare checks every fold). Leakage-free "
                f"cross-validation: {fix}, then train fold {k} again")

    def load_pgl_weights(self, path: str, ckpt: Optional[Dict[str, Any]] = None) -> Tuple[int, int]:
        """Copy the checkpoint's U-Net weights into the (unwrapped) network; log a report; return (loaded, skipped)."""
        weights = (ckpt if ckpt is not None else read_pgl_checkpoint(path))["network_weights"]
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

    pgl_method = "byol"


class nnUNetTrainerPGLplusBYOL(nnUNetTrainerPGL):
    """Initialised from PGL with the global BYOL term (``pgl_pretrain --method pgl+byol``). Twin: Scratch."""

    pgl_method = "pgl+byol"


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


#: every trainer class defined here (the shim nnU-Net searches imports these)
__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == __name__]
