# Shim for nnU-Net's trainer search (nnUNet_extTrainer): re-exports, absolute imports only, no classes defined here.
from nnunet_pgl.trainers.pgl import (  # noqa: F401
    nnUNetTrainerPGL, nnUNetTrainerPGL_1epochs, nnUNetTrainerPGL_5epochs, nnUNetTrainerPGL_10epochs,
    nnUNetTrainerPGL_50epochs, nnUNetTrainerPGL_100epochs, nnUNetTrainerPGL_250epochs, nnUNetTrainerPGL_demo,
    nnUNetTrainerPGL_encoderOnly, nnUNetTrainerPGL_smoke, nnUNetTrainerPGLBYOL, nnUNetTrainerScratch,
    nnUNetTrainerScratch_1epochs, nnUNetTrainerScratch_5epochs, nnUNetTrainerScratch_10epochs,
    nnUNetTrainerScratch_50epochs, nnUNetTrainerScratch_100epochs, nnUNetTrainerScratch_250epochs,
    nnUNetTrainerScratch_demo, nnUNetTrainerScratch_smoke)
from nnunet_pgl.trainers.fractions import (  # noqa: F401
    nnUNetTrainerPGL_frac10, nnUNetTrainerPGL_frac25, nnUNetTrainerPGL_frac50, nnUNetTrainerPGL_smoke_frac10,
    nnUNetTrainerPGL_smoke_frac25, nnUNetTrainerPGL_smoke_frac50, nnUNetTrainerPGLBYOL_frac10,
    nnUNetTrainerPGLBYOL_frac25, nnUNetTrainerPGLBYOL_frac50, nnUNetTrainerScratch_frac10,
    nnUNetTrainerScratch_frac25, nnUNetTrainerScratch_frac50, nnUNetTrainerScratch_smoke_frac10,
    nnUNetTrainerScratch_smoke_frac25, nnUNetTrainerScratch_smoke_frac50)
