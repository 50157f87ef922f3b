"""nnU-Net glue for PGL pretraining (installed as ``nnunet_pgl.pretraining``)."""
