# Shim for nnU-Net's trainer search (nnUNet_extTrainer): re-exports what the trainer modules export (``__all__``),
# absolute imports only, no classes defined here.
from nnunet_pgl.trainers.pgl import *  # noqa: F401,F403
from nnunet_pgl.trainers.fractions import *  # noqa: F401,F403
