"""Tests of ``nnunet_pgl.pretraining.atomic``: the one tmp-file, fsync and rename sequence."""
from __future__ import annotations

import json
import os

import pytest

from nnunet_pgl.pretraining.atomic import atomic_write, atomic_write_json, atomic_write_text, save_figure


def test_replaces_the_target_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_json(str(target), {"b": [1, 2]}, indent=1)
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert target.read_text() == json.dumps({"b": [1, 2]}, indent=1)
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    target = tmp_path / "ckpt.pth"
    target.write_text("complete")
    seen = []

    def half_then_fail(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(target), half_then_fail)
    assert seen == [str(target) + ".tmp"]  # beside the target, under the name the pretrainer cleans up
    assert target.read_text() == "complete"
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_named_temporary_file_and_figures(tmp_path):
    atomic_write_text(str(tmp_path / "index.json"), "[]", tmp=str(tmp_path / ".pgltmp-1-index.json"))
    assert sorted(os.listdir(tmp_path)) == ["index.json"]

    class Figure:  # matplotlib takes the format from the file ending: the temporary name must end in .png
        def savefig(self, path: str, **kw) -> None:
            assert path.endswith(".tmp.png") and kw == {"dpi": 80}
            with open(path, "wb") as f:
                f.write(b"\x89PNG")

    save_figure(Figure(), str(tmp_path / "progress.png"), dpi=80)
    assert (tmp_path / "progress.png").read_bytes() == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["index.json", "progress.png"]
