"""Evaluation of pretrained networks on an nnU-Net dataset (``nnunet_pgl.evaluation``).

* ``pgl_probe`` (:mod:`.probe_cli`, :mod:`.probe`): how well frozen features separate the classes, without
  fine-tuning.
* ``pgl_compare`` (:mod:`.compare`, read first; then :mod:`.results`, :mod:`.stats`, :mod:`.leakage`, :mod:`.jobs`,
  :mod:`.report` and :mod:`.figure`): does fine-tuning from a pretraining beat training from scratch, paired case
  by case over nnU-Net's validation folds, with the leakage guard.
"""
