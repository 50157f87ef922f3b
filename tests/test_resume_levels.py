"""``--c`` rebuilds the run's loss levels (issue 11, item 5): ``pgl+byol`` with ``--levels`` that leave out the
bottleneck resumes (the saved configuration holds the loss levels, not the feature levels the global term adds),
and a ``--c`` with other levels stops with the levels to pass."""
from __future__ import annotations

import json

import pytest

from tiny_pretrain import load_checkpoint, output_folder, pgl_pretrain, tiny  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # in-process pgl_pretrain runs


def test_pgl_byol_with_levels_without_the_bottleneck_resumes(tiny):
    pgl_pretrain("--method", "pgl+byol", "--levels", "2", "3", "--epochs", "1", "--iters-per-epoch", "1",
                 "--no-probe")
    out = output_folder(tiny, "nnUNetPretrainerPGLBYOL")
    assert json.loads((out / "pgl_config.json").read_text())["levels"] == [2, 3]  # the bottleneck is level 4
    first = load_checkpoint(out / "checkpoint_final.pth")
    pgl_pretrain("--method", "pgl+byol", "--c", "--epochs", "2", "--no-probe")
    ck = load_checkpoint(out / "checkpoint_final.pth")
    assert ck["current_epoch"] == 2 and ck["pgl_meta"]["levels"] == [2, 3]
    assert ck["pgl_heads"].keys() == first["pgl_heads"].keys()  # two local projectors + the global one
    assert any(k.startswith("projectors.1.") for k in ck["pgl_heads"])
    assert not any(k.startswith("projectors.2.") for k in ck["pgl_heads"])
    assert any(k.startswith("global_projector.") for k in ck["pgl_heads"])
    log = json.loads((out / "pgl_log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["global_loss"] is not None


def test_resume_with_other_levels_says_which_to_pass(tiny, capsys):
    pgl_pretrain("--levels", "2", "3", "--epochs", "1", "--iters-per-epoch", "1", "--no-probe")
    out = output_folder(tiny)
    before = (out / "checkpoint_final.pth").read_bytes()
    with pytest.raises(SystemExit) as e:
        pgl_pretrain("--c", "--levels", "3", "4", "--epochs", "2", "--no-probe")
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "pretrained with loss levels [2, 3], but this run builds levels [3, 4]" in err
    assert "Resume with --c --levels 2 3" in err
    assert (out / "checkpoint_final.pth").read_bytes() == before  # nothing lost
