# Shim for nnU-Net's trainer search (nnUNet_extTrainer): re-exports, absolute imports only, no classes defined here.
from nnunet_pgl.trainers.variants import nnUNetTrainerScratch_smoke  # noqa: F401
