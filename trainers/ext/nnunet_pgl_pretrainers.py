# Shim for nnU-Net's trainer search (nnUNet_extTrainer): re-exports what the pretrainer module exports (``__all__``),
# absolute imports only, no classes defined here.
from nnunet_pgl.pretraining.pretrainer import *  # noqa: F401,F403
