"""Short-schedule fine-tuning trainers (tiny nnU-Net-style subclasses; ``__init__`` signature unchanged)."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerScratch_smoke(nnUNetTrainer):
    """Random init, 1 epoch of 5 iterations and 2 validation iterations: for CPU tests and smoke runs only."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 2
