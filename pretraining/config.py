"""The resolved pretraining configuration (``pgl_config.json``) and how it reaches every trainer process.

nnU-Net rebuilds trainers from ``(plans, configuration, fold, dataset_json, device)`` only (also in each DDP rank),
so the pretrainer cannot take extra ``__init__`` arguments. ``pgl_pretrain`` writes the resolved configuration as
``pgl_config.json`` into the output folder and points the environment variable ``nnUNet_pgl_config`` at it; the
pretrainer reads it in ``__init__`` (spawned DDP ranks inherit the variable). Without the variable, the defaults
below apply, so ``nnUNetv2_train D 3d_fullres all -tr nnUNetPretrainerPGL`` also runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from nnunet_pgl.pretraining.atomic import atomic_write_json

CONFIG_ENV = "nnUNet_pgl_config"
CONFIG_FILE = "pgl_config.json"



@dataclass
class PretrainConfig:
    """Every setting of a pretraining run. Defaults are the full schedule, not a demo."""

    method: str = "pgl"
    levels: Optional[List[int]] = None          # None: stride >= 2 in every pooled axis (nnunet_pgl.default_levels)
    epochs: int = 500                           # paper: 500 epochs
    iters_per_epoch: int = 250                  # nnU-Net's epoch length
    batch_size: Optional[int] = None            # pairs per step, all GPUs together; None: the plans' batch size
    initial_lr: float = 1e-2                    # SGD, nesterov momentum 0.99, as nnU-Net trains this network
    weight_decay: float = 3e-5
    momentum: float = 0.99
    warmup_epochs: int = 2                      # paper: 2 warm-up epochs, then cosine
    grad_clip: float = 12.0                     # nnU-Net's value
    base_tau: float = 0.996                     # EMA momentum, cosine to 1
    proj_dim: int = 128
    hidden_dim: int = 512
    global_weight: float = 1.0                  # weight of the BYOL term in 'pgl+byol'
    scale_range: List[float] = field(default_factory=lambda: [1.1, 1.4])
    min_overlap: float = 0.1
    flip_prob: float = 0.5
    intensity_aug: bool = True
    save_every: int = 5                         # epochs between checkpoint_latest.pth writes
    num_workers: Optional[int] = None           # None: nnU-Net's nnUNet_n_proc_DA rule, capped at 4
    seed: int = 12345
    max_bad_steps: int = 5                      # consecutive non-finite steps before the run stops
    use_labeled_images: bool = True
    exclude_fold: Optional[int] = None
    probe: bool = True                          # dense linear probe at the start, every save_every epochs, the end
    probe_cases: int = 8                        # labeled training cases of the probe: half to fit, half to score
    probe_samples: int = 256                    # voxels per class and case crop
    collapse_every: int = 25                    # iterations between collapse/shortcut statistics (0: off)
    unlabeled_dirs: List[str] = field(default_factory=list)
    # filled in by pgl_pretrain: the unlabeled cases after ingestion ({case_id, data_file, sha256, source})
    unlabeled_cases: List[Dict[str, Any]] = field(default_factory=list)
    # run state, set by the pretrainer (never from the command line): where a resumed run's schedule changed length
    # ({start_step, start_epoch, from_epochs, from_iters_per_epoch, lr, tau, ramp_steps}; see
    # nnunet_pgl.pretraining.schedule.scheduled_lr_tau). Restored from the checkpoint on --c, None on a fresh run.
    schedule_extension: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in the PGL pretraining configuration; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_json(), indent=2)

    @classmethod
    def load(cls, path: str) -> "PretrainConfig":
        with open(path) as f:
            return cls.from_json(json.load(f))


def config_from_env() -> PretrainConfig:
    """The configuration named by ``$nnUNet_pgl_config``, or the defaults."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return PretrainConfig()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{CONFIG_ENV}={path} does not exist. Unset the variable or run pgl_pretrain, which "
                                "writes it")
    return PretrainConfig.load(path)
