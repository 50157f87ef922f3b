"""``pgl_demo``: PGL pretraining vs. training from scratch on synthetic CT, in one command (``nnunet_pgl.demo``).

Read :mod:`.cli` first: its ``main`` is the demo's steps in order. :mod:`.config` turns a preset and the flags into a
:class:`~.config.DemoConfig`; :mod:`.stages` runs the stock commands in subprocesses; :mod:`.report` reads nnU-Net's
results and writes the report; :mod:`.synthetic` makes the CT phantoms (also used by the tests and benchmarks).
"""
