"""nnU-Net fine-tuning trainers initialised from PGL checkpoints (installed as ``nnunet_pgl.trainers``)."""
