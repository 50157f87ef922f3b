"""Evaluation of pretrained networks on an nnU-Net dataset without fine-tuning (``nnunet_pgl.evaluation``)."""
