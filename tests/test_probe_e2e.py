"""The probe and the collapse statistics inside ``pgl_pretrain`` (the session's ``pretrained`` run), ``pgl_probe``
end to end on its checkpoint, and seeded fine-tuning (two identical ``nnUNetv2_train`` runs)."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow

from conftest import BIN, DATASET, run  # noqa: E402


def test_pretraining_logs_probe_and_collapse(pretrained):
    env, out, text = pretrained
    log = json.loads((out / "pgl_log.json").read_text())
    levels = [str(lv) for lv in log[-1]["levels"]]
    init = log[0]["probe_random_init"]
    assert sum("probe_random_init" in r for r in log) == 1
    assert "probe" not in log[0] and "probe" in log[-1]  # 2 epochs, --save-every 5: only the last epoch probes
    for res in (init, log[-1]["probe"]):
        assert list(res["levels"]) == levels and set(res["per_class"]) == set(levels) | {"all"}
        assert set(res["per_class"]["all"]) == {"0", "1", "2", "3"}
        assert all(0.0 <= v <= 1.0 for v in list(res["levels"].values()) + [res["all"]])
    for r in log:
        assert [s["level"] for s in r["collapse"]] == log[-1]["levels"]
        assert all(0.0 < s["spread"] <= 1.0 + 1e-6 and s["effective_rank"] >= 1.0 for s in r["collapse"])
    # the fixture's own run wrote the oldest training log (test_resume_continues_from_saved_epoch may add one)
    training_log = min((f for f in os.listdir(out) if f.startswith("training_log_")),
                       key=lambda f: (out / f).stat().st_mtime_ns)
    tl = (out / training_log).read_text()
    for line in ("Probe: levels", "Probe (random init):", "Probe (epoch 1):", "Probe time:", "Collapse/shortcut:"):
        assert line in tl and line in text, line
    assert "collapsed" not in tl  # a healthy run is not flagged


def test_pgl_probe_reproduces_the_pretraining_probe(pretrained, tmp_path):
    """pgl_probe on 'random' and on checkpoint_final.pth gives the scores that pgl_pretrain logged for its random
    init and its last epoch: same cases, crops, voxels and initialisation seed."""
    env, out, _ = pretrained
    ck = str(out / "checkpoint_final.pth")
    js = tmp_path / "probe.json"
    p = run([f"{BIN}/pgl_probe", "-d", "991", "-device", "cpu", "random", ck, ck, "--json", str(js)], env)
    res = json.loads(js.read_text())
    assert list(res) == ["random", ck]                                # one entry per checkpoint, duplicates once
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[0].startswith("| checkpoint | level")
    log = json.loads((out / "pgl_log.json").read_text())
    ckpt = torch.load(ck, weights_only=True)
    last = next(r for r in reversed(ckpt["pgl_log"]) if r.get("probe"))  # the log of the weights in the file
    for mine, theirs in ((res["random"], log[0]["probe_random_init"]), (res[ck], last["probe"])):
        assert mine["levels"] == pytest.approx(theirs["levels"], abs=1e-4)
        assert mine["all"] == pytest.approx(theirs["all"], abs=1e-4)
        assert mine["cases"] == theirs["cases"]
    assert (tmp_path / "probe.png").is_file()


def test_seeded_finetuning_repeats_exactly(planned, tmp_path):
    """With nnUNet_pgl_seed (pgl_demo sets it) two fine-tuning runs on CPU end with identical weights."""
    env, _, root = planned
    weights = []
    for i in range(2):
        e = dict(env, nnUNet_results=str(tmp_path / f"res{i}"), nnUNet_pgl_seed="7")
        run([f"{BIN}/nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "nnUNetTrainerScratch_smoke", "-device", "cpu"],
            e)
        ck = tmp_path / f"res{i}" / DATASET / "nnUNetTrainerScratch_smoke__nnUNetPlans__3d_fullres" / "fold_0"
        weights.append(torch.load(ck / "checkpoint_final.pth", map_location="cpu", weights_only=False)
                       ["network_weights"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_probe_never_touches_the_held_out_fold(planned):
    """With exclude_fold=K the probe's cases avoid fold K's validation cases, from splits_final.json where it exists,
    else from nnU-Net's default 5-fold split (computed, not written)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pgl.evaluation.probe import build_probe_set, validation_cases

    env, _, _ = planned
    base = os.path.join(env["nnUNet_preprocessed"], DATASET)
    pm = PlansManager(os.path.join(base, "nnUNetPlans.json"))
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(json.load(open(os.path.join(base, "dataset.json"))))
    data = os.path.join(base, cm.data_identifier)
    ids = sorted(f[:-5] for f in os.listdir(data) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
    splits_file = os.path.join(base, "splits_final.json")
    had_splits = os.path.isfile(splits_file)
    folds = [validation_cases(base, ids, k) for k in range(5)]
    assert sorted(sum(folds, [])) == ids                                # the folds' validation cases partition ids
    assert os.path.isfile(splits_file) == had_splits                    # nothing written
    for k in (0, 3):
        ps = build_probe_set(base, data, cm.patch_size, lm, n_cases=8, exclude_fold=k)
        used = ps.case_ids["fit"] + ps.case_ids["score"]
        assert sorted(used) == sorted(set(ids) - set(folds[k]))         # 6 cases, 8 asked for: all but fold k's
        assert all(c.image.shape[1:] == tuple(cm.patch_size) for c in ps.fit + ps.score)
    with pytest.raises(ValueError, match="--exclude-fold 7"):
        validation_cases(base, ids, 7)
