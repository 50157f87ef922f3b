# Shim for nnU-Net's trainer search (nnUNet_extTrainer): re-exports, absolute imports only, no classes defined here.
from nnunet_pgl.pretraining.pretrainer import (nnUNetPretrainerBYOL, nnUNetPretrainerPGL,  # noqa: F401
                                               nnUNetPretrainerPGLBYOL)
