"""nnU-Net glue for PGL pretraining (installed as ``nnunet_pgl.pretraining``).

Read :mod:`.run` first: :func:`~.run.pretrain` is ``pgl_pretrain`` as a function (:mod:`.cli` only parses the
flags), from the dataset checks to nnU-Net's ``run_training``. Then :mod:`.pretrainer`, the ``nnUNetTrainer`` whose
hooks do the pretraining, with its mixins :mod:`.checkpointing` (what ``--c`` resumes from), :mod:`.monitor` (epoch
log, probe, collapse statistics) and the pure helpers :mod:`.schedule` and :mod:`.cases`. :mod:`.contract` is what a
pretraining promises the fine-tuning trainers (where it writes, ``pgl_meta``, the method map). The data path is
:mod:`.ingest` (unlabeled folders into nnU-Net's training space, in phases) and :mod:`.loader` (region pairs).
:mod:`.config` is the resolved configuration, :mod:`.lock` the one-run-per-folder lock, :mod:`.atomic` the one way
files are written, :mod:`.pictures` the figures.
"""
