"""pgl_compare: statistics against hand-computed values, pairing by case id across folds, report rendering from
nnU-Net-format summary.json folders, the leakage guard on a fake checkpoint, label-fraction subsets (also through
the trainers' do_split on a planned dataset), and one end-to-end ``pgl_compare --run`` on CPU."""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import BIN, DATASET, run, write_summary

from nnunet_pgl.evaluation import compare as C
from nnunet_pgl.evaluation import jobs as J
from nnunet_pgl.evaluation import leakage as LK
from nnunet_pgl.evaluation import report as RP
from nnunet_pgl.evaluation import results as RS
from nnunet_pgl.evaluation import stats as S
from nnunet_pgl.trainers.fractions import label_subset


# ============================================================================================== statistics
@pytest.mark.parametrize("n", range(2, 13))
def test_wilcoxon_all_positive_distinct_is_two_over_two_to_the_n(n):
    # all n differences positive with distinct magnitudes: W- = 0 is the most extreme of the 2^n equally likely
    # sign patterns, on each side once -> two-sided exact p = 2 / 2^n
    assert S.wilcoxon_p(np.arange(1, n + 1) * 0.01) == pytest.approx(2.0 / 2 ** n)
    assert S.wilcoxon_p(-np.arange(1, n + 1) * 0.01) == pytest.approx(2.0 / 2 ** n)


def test_wilcoxon_mixed_signs_hand_counted():
    # ranks 1..5, rank 4 negative: W- = 4. Subsets of {1..5} with sum <= 4: {}, {1}, {2}, {3}, {4}, {1,2}, {1,3}
    # -> P(W <= 4) = 7/32, two-sided p = 14/32
    assert S.wilcoxon_p([0.1, 0.2, 0.3, -0.4, 0.5]) == pytest.approx(14 / 32)
    # W- = 1 (rank 1 negative), n = 4: subsets with sum <= 1: {}, {1} -> 2/16, two-sided 4/16
    assert S.wilcoxon_p([-1, 2, 3, 4]) == pytest.approx(4 / 16)


def test_wilcoxon_not_applicable():
    assert S.wilcoxon_p([]) is None
    assert S.wilcoxon_p([0.3]) is None          # n < 2
    assert S.wilcoxon_p([0.0, 0.0, 0.0]) is None  # all differences zero
    # zeros are dropped (Wilcoxon's original treatment): same p as without them
    assert S.wilcoxon_p([0.0, 1, 2, 3, 4, 5]) == pytest.approx(S.wilcoxon_p([1, 2, 3, 4, 5]))


def test_bootstrap_ci_two_values_is_the_full_range():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th and 97.5th percentiles
    # are 0 and 1
    assert S.bootstrap_ci([0.0, 1.0], n_boot=20000, seed=0) == (0.0, 1.0)
    assert S.bootstrap_ci([0.3] * 7, n_boot=100, seed=1) == pytest.approx((0.3, 0.3))  # no spread, no width
    assert all(math.isnan(v) for v in S.bootstrap_ci([], n_boot=10))
    with pytest.raises(ValueError, match="n_boot=0"):
        S.bootstrap_ci([1.0], n_boot=0)


def test_bootstrap_ci_excludes_or_contains_zero_and_is_seeded():
    rng = np.random.default_rng(7)
    helps = 0.05 + 0.01 * rng.standard_normal(20)  # every case better: CI well above 0
    lo, hi = S.bootstrap_ci(helps, n_boot=5000, seed=0)
    assert 0 < lo < helps.mean() < hi
    # the sample standard error is ~0.0022: a 95 % CI about ±1.96 SE wide
    se = helps.std(ddof=1) / math.sqrt(helps.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    noise = np.array([1.0, -1.0] * 10)  # symmetric: mean 0, CI straddles 0
    lo, hi = S.bootstrap_ci(noise, n_boot=5000, seed=0)
    assert lo < 0 < hi
    assert S.bootstrap_ci(helps, 1000, seed=3) == S.bootstrap_ci(helps, 1000, seed=3)
    assert S.bootstrap_ci(helps, 1000, seed=3) != S.bootstrap_ci(helps, 1000, seed=4)


def test_win_loss_tie_and_paired_stats_drop_nan_pairs():
    assert S.win_loss_tie([0.1, -0.2, 0.0, 0.3]) == (2, 1, 1)
    s = S.paired_stats([0.9, 0.8, float("nan"), 0.5, 0.7], [0.7, 0.9, 0.6, 0.5, float("nan")], n_boot=200)
    assert s.n == 3 and s.n_nan == 2
    assert (s.wins, s.losses, s.ties) == (1, 1, 1)
    assert s.mean_diff == pytest.approx((0.2 - 0.1 + 0.0) / 3)
    assert s.mean_a == pytest.approx((0.9 + 0.8 + 0.5) / 3) and s.mean_b == pytest.approx((0.7 + 0.9 + 0.5) / 3)
    with pytest.raises(ValueError, match="same number"):
        S.paired_stats([1.0], [1.0, 2.0])


# ============================================================================================== fake results
LABELS = {"background": 0, "liver": 1, "kidney": 2}


def _case(case_id, dice1, dice2, fp=3, fn=4):
    """One metric_per_case entry as compute_metrics makes it (numpy values, int label keys)."""
    def lab(d):
        if d is None:  # class absent in reference and prediction
            return {"Dice": np.nan, "IoU": np.nan, "FP": np.int64(0), "TP": np.int64(0), "FN": np.int64(0),
                    "TN": np.int64(1000), "n_pred": np.int64(0), "n_ref": np.int64(0)}
        return {"Dice": np.float64(d), "IoU": np.float64(d / (2 - d)), "FP": np.int64(fp), "TP": np.int64(50),
                "FN": np.int64(fn), "TN": np.int64(900), "n_pred": np.int64(50 + fp), "n_ref": np.int64(50 + fn)}
    return {"reference_file": f"/pre/Dataset990_Fake/gt_segmentations/{case_id}.nii.gz",
            "prediction_file": f"/res/fold_x/validation/{case_id}.nii.gz", "metrics": {1: lab(dice1), 2: lab(dice2)}}


# fold 0: c0, c3; fold 1: c1, c2 (case order inside a fold differs between the arms on purpose)
ARM_A = {0: [("c3", 0.80, 0.60), ("c0", 0.90, 0.70)], 1: [("c1", 0.70, None), ("c2", 0.60, 0.50)]}
ARM_B = {0: [("c0", 0.85, 0.70), ("c3", 0.70, 0.50)], 1: [("c2", 0.65, 0.40), ("c1", 0.60, 0.30)]}


def _fake_results(root, trainers=("nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"), arms=(ARM_A, ARM_B)):
    res = root / "res" / "Dataset990_Fake"
    for t, arm in zip(trainers, arms):
        for fold, cases in arm.items():
            write_summary(res / f"{t}__nnUNetPlans__3d_fullres" / f"fold_{fold}" / "validation" / "summary.json",
                          [_case(*c) for c in cases])
    return res


def test_summary_read_back_in_nnunet_format(tmp_path):
    res = _fake_results(tmp_path)
    p = res / "nnUNetTrainerPGL_smoke__nnUNetPlans__3d_fullres" / "fold_1" / "validation" / "summary.json"
    raw = json.loads(p.read_text().replace("NaN", "null"))
    assert list(raw) == ["foreground_mean", "mean", "metric_per_case"]  # nnU-Net's sort_keys layout
    s = RS.read_summary(str(p), ".nii.gz")
    assert set(s) == {"c1", "c2"} and set(s["c1"]) == {"1", "2"}
    assert s["c2"]["1"]["Dice"] == 0.6 and math.isnan(s["c1"]["2"]["Dice"]) and s["c2"]["1"]["FP"] == 3


def test_pairing_by_case_id_across_folds(tmp_path):
    res = _fake_results(tmp_path)
    a = RS.collect_arm(str(res), "nnUNetTrainerPGL_smoke", "nnUNetPlans", "3d_fullres", [0, 1, 2], ".nii.gz")
    b = RS.collect_arm(str(res), "nnUNetTrainerScratch_smoke", "nnUNetPlans", "3d_fullres", [0, 1, 2], ".nii.gz")
    assert a.folds_found == [0, 1] and a.folds_missing == [2]
    c = RS.compare_arms(a, b, n_boot=500, seed=0)
    assert c.n_cases == 4 and c.labels == ["1", "2"]
    liver = {x.case_id: x.diff for x in c.classes["1"].cases}
    assert liver == pytest.approx({"c0": 0.05, "c1": 0.10, "c2": -0.05, "c3": 0.10})
    s = c.classes["1"].Dice
    assert s.mean_diff == pytest.approx(0.05) and (s.wins, s.losses, s.ties) == (3, 1, 0)
    # ranks of |d| = .05, .05, .1, .1 -> 1.5, 1.5, 3.5, 3.5; W- = 1.5 (c2)
    from scipy.stats import wilcoxon
    assert s.p == pytest.approx(wilcoxon([0.05, 0.10, -0.05, 0.10]).pvalue)
    kidney = c.classes["2"]
    assert kidney.Dice.n == 3 and kidney.Dice.n_nan == 1  # c1 has no kidney in arm A (NaN)
    assert kidney.Dice.mean_diff == pytest.approx((0.0 + 0.1 + 0.1) / 3)
    # nnU-Net's means: NaN left out of the class mean, foreground = mean of the class means
    assert kidney.mean_a["Dice"] == pytest.approx((0.6 + 0.7 + 0.5) / 3)
    assert kidney.mean_b["Dice"] == pytest.approx((0.7 + 0.5 + 0.4 + 0.3) / 4)
    fg = c.classes[RS.OVERALL]
    assert fg.mean_a["Dice"] == pytest.approx(((0.9 + 0.8 + 0.7 + 0.6) / 4 + 0.6) / 2)
    # per-case foreground value: mean of the case's non-NaN classes (c1 in arm A: liver only)
    per_case = {x.case_id: (x.a, x.b) for x in fg.cases}
    assert per_case["c1"] == pytest.approx((0.70, (0.60 + 0.30) / 2))
    assert [f.fold for f in c.per_fold] == [0, 1] and c.per_fold[0].n == 2
    # FP: 3 per case where a class is present, 0 for the absent kidney of c1 -> kidney (3+3+3+0)/4, liver 3
    assert c.classes["2"].mean_a["FP"] == 2.25 and fg.mean_a["FP"] == (3 + 2.25) / 2


def test_case_validated_in_two_folds_is_an_error(tmp_path):
    arm = {0: [("c0", 0.9, 0.8)], 1: [("c0", 0.8, 0.7)]}
    res = _fake_results(tmp_path, arms=(arm, arm))
    with pytest.raises(RS.CompareError, match="case c0 is validated in fold 0 and fold 1"):
        RS.collect_arm(str(res), "nnUNetTrainerPGL_smoke", "nnUNetPlans", "3d_fullres", [0, 1], ".nii.gz")


# ============================================================================================== leakage guard
def _write_raw_case(raw_ds, case_id, payloads, ending=".nii.gz"):
    files = []
    for ch, data in enumerate(payloads):
        p = raw_ds / "imagesTr" / f"{case_id}_{ch:04d}{ending}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files.append(p)
    return files


def test_find_leaks_labeled_by_id_and_unlabeled_by_raw_hash(tmp_path):
    raw = tmp_path / "raw" / "Dataset990_Fake"
    _write_raw_case(raw, "c0", [b"image zero"])
    f3 = _write_raw_case(raw, "c3", [b"image three, copied into the unlabeled folder"])
    _write_raw_case(raw, "c1", [b"image one"])
    files = LK.raw_image_files(str(raw), {"file_ending": ".nii.gz"}, ["c0", "c1", "c2", "c3"])
    assert set(files) == {"c0", "c1", "c3"}  # c2 has no raw file
    meta = {"dataset_name": "Dataset990_Fake", "cases": [
        {"case_id": "c0", "kind": "labeled", "sha256": "a" * 64},
        {"case_id": "c5", "kind": "labeled", "sha256": "b" * 64},
        {"case_id": "unl_0123456789abcdef", "kind": "unlabeled",
         "sha256": hashlib.sha256(f3[0].read_bytes()).hexdigest(), "source": ["/data/unlabeled/scan7.nii.gz"]},
        {"case_id": "unl_ffffffffffffffff", "kind": "unlabeled", "sha256": "c" * 64, "source": ["/x.nrrd"]}]}
    out = LK.find_leaks(meta, "Dataset990_Fake", {0: ["c0", "c3"], 1: ["c1", "c2"]}, files)
    assert out[0].labeled == ["c0"] and out[0].leaked == ["c0", "c3"] and out[0].n_val == 2
    assert out[0].unlabeled == [{"case_id": "c3", "pretrain_case_id": "unl_0123456789abcdef",
                                    "source": ["/data/unlabeled/scan7.nii.gz"]}]
    assert out[1].leaked == [] and out[1].unchecked == ["c2"]
    lines = RP.leakage_lines([LK.LeakReport("nnUNetPretrainerPGL", "/ck.pth", arms=["nnUNetTrainerPGL"], folds=out)],
                             "Dataset990_Fake", "3d_fullres", "nnUNetPlans")
    assert lines[0].startswith("**LEAKAGE: 2 of 2 validation cases of fold 0 were seen in pretraining; rerun "
                               "pgl_pretrain --exclude-fold 0**")
    assert "labeled images: c0" in lines[0] and "scan7.nii.gz" in lines[0]
    assert any(ln.startswith("To fix") and "remove the listed copies" in ln for ln in lines)
    assert not any("fold 1 were seen" in ln for ln in lines)
    assert any("could not be checked" in ln and "c2" in ln for ln in lines)


def test_no_leakage_is_stated():
    meta = {"dataset_name": "D", "cases": [{"case_id": "c9", "kind": "labeled", "sha256": "a" * 64}]}
    out = LK.find_leaks(meta, "D", {0: ["c0", "c1"]}, {})
    lines = RP.leakage_lines([LK.LeakReport("nnUNetPretrainerPGL", "/ck.pth", arms=["nnUNetTrainerPGL"], folds=out)],
                             "D", "3d_fullres", "nnUNetPlans")
    assert lines == [lines[0]] and lines[0].startswith("**Leakage guard: no leakage**")


def test_raw_hash_matches_what_ingestion_hashes_for_multichannel_cases(tmp_path):
    """The guard hashes a validation case's raw files exactly as ingest hashes an unlabeled case (channel order)."""
    import SimpleITK as sitk
    from nnunet_pgl.pretraining.ingest.discovery import discover
    from nnunet_pgl.pretraining.ingest.integrity import hash_and_check
    raw = tmp_path / "raw"
    unl = tmp_path / "unlabeled"
    (raw / "imagesTr").mkdir(parents=True)
    unl.mkdir()
    rng = np.random.default_rng(0)
    for ch in (1, 0):  # written out of order on purpose
        img = sitk.GetImageFromArray(rng.normal(size=(4, 5, 6)).astype(np.float32))
        sitk.WriteImage(img, str(raw / "imagesTr" / f"c7_{ch:04d}.nii.gz"))
        sitk.WriteImage(img if ch else sitk.GetImageFromArray(rng.normal(size=(4, 5, 6)).astype(np.float32)),
                        str(raw / "imagesTr" / f"c8_{ch:04d}.nii.gz"))
    for n in ("c7_0000.nii.gz", "c7_0001.nii.gz"):  # the user put a copy of c7 into the unlabeled folder
        (unl / n).write_bytes((raw / "imagesTr" / n).read_bytes())
    groups, _, _ = discover([str(unl)], 2)
    ingested_sha = hash_and_check(groups[0].hashed)[0]
    files = LK.raw_image_files(str(raw), {"file_ending": ".nii.gz"}, ["c7", "c8"])
    assert [os.path.basename(p) for p in files["c7"]] == ["c7_0000.nii.gz", "c7_0001.nii.gz"]
    meta = {"dataset_name": "D", "cases": [{"case_id": "unl_x", "kind": "unlabeled", "sha256": ingested_sha}]}
    assert LK.find_leaks(meta, "D", {0: ["c7", "c8"]}, files)[0].leaked == ["c7"]


def test_leakage_guard_hashes_each_validation_image_once(tmp_path, monkeypatch):
    """Two checkpoints of one comparison (one cache) read each validation case's raw files once."""
    import nnunet_pgl.pretraining.contract as contract
    calls = []
    monkeypatch.setattr(contract, "sha256_of_files", lambda files: calls.append(tuple(files)) or "f" * 64)
    meta = {"dataset_name": "D", "cases": [{"case_id": "unl_x", "kind": "unlabeled", "sha256": "e" * 64}]}
    files = {"c0": ["/raw/c0_0000.nii.gz"], "c1": ["/raw/c1_0000.nii.gz"]}
    cache: dict = {}
    for _ in range(2):
        LK.find_leaks(meta, "D", {0: ["c0"], 1: ["c1"]}, files, sha_cache=cache)
    assert sorted(calls) == [("/raw/c0_0000.nii.gz",), ("/raw/c1_0000.nii.gz",)]


# ============================================================================================== report rendering
def _fake_project(tmp_path, monkeypatch, leak_case="c3"):
    res = _fake_results(tmp_path)
    pre = tmp_path / "pre" / "Dataset990_Fake"
    pre.mkdir(parents=True)
    plans = json.loads(open(os.path.join(os.path.dirname(__file__), "data", "plans_plain.json")).read())
    plans["dataset_name"] = "Dataset990_Fake"
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                  "numTraining": 4, "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["c1", "c2"], "val": ["c0", "c3"]},
                                                       {"train": ["c0", "c3"], "val": ["c1", "c2"]}]))
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"network_weights": {}, "pgl_meta": {"dataset_name": "Dataset990_Fake", "cases": [
        {"case_id": leak_case, "kind": "labeled", "sha256": "0" * 64},
        {"case_id": "c9", "kind": "labeled", "sha256": "1" * 64}]}}, ckpt)
    for k, v in (("nnUNet_raw", tmp_path / "raw"), ("nnUNet_preprocessed", tmp_path / "pre"),
                 ("nnUNet_results", tmp_path / "res"), ("nnUNet_pgl_weights", ckpt)):
        monkeypatch.setenv(k, str(v))
    return res


def test_report_from_fake_summaries(tmp_path, monkeypatch, capsys):
    res = _fake_project(tmp_path, monkeypatch)
    log_dir = res / "nnUNetTrainerScratch_smoke__nnUNetPlans__3d_fullres" / "fold_0"
    (log_dir / "training_log_2026_1_1_00_00_00.txt").write_text(
        "\n2026-01-01 00:00:00.000000: Epoch 0 \n2026-01-01 00:00:00.100000: Current learning rate: 0.01 \n"
        "2026-01-01 00:00:01.000000: train_loss -0.1 \n2026-01-01 00:00:01.000000: val_loss -0.2 \n"
        "2026-01-01 00:00:01.000000: Pseudo dice [np.float32(0.5), np.float32(0.7)] \n"
        "2026-01-01 00:00:02.000000: Epoch 1 \n2026-01-01 00:00:03.000000: train_loss -0.3 \n"
        "2026-01-01 00:00:03.000000: val_loss -0.4 \n2026-01-01 00:00:03.000000: Pseudo dice [np.float32(0.7), "
        "np.float32(0.9)] \n")
    C.main(["-d", "Dataset990_Fake", "-f", "0", "1", "--pair", "nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke",
            "--n-boot", "2000"])
    out_dir = res / "pgl_compare"
    md = (out_dir / "pgl_compare_Dataset990_Fake.md").read_text()
    assert md.rstrip("\n") == capsys.readouterr().out.split("[pgl_compare] wrote")[0].rstrip("\n")  # printed
    assert md.startswith("# Does pretraining help? nnUNetTrainerPGL_smoke vs nnUNetTrainerScratch_smoke on "
                         "Dataset990_Fake")
    first = md.split("\n\n")[1]
    assert first.startswith("**LEAKAGE: 1 of 2 validation cases of fold 0 were seen in pretraining; rerun "
                            "pgl_pretrain --exclude-fold 0**") and "c3" in first
    assert "fold 1 were seen" not in md
    # liver: A = .9 .7 .6 .8 (mean .75), B = .85 .6 .65 .7 (mean .7), Δ +0.05, 3 wins 1 loss
    assert "| liver (1) | 4 | 0.7500 | 0.7000 | +0.0500 | [" in md and "| 3/1/0 |" in md
    # kidney: c1 is NaN in A -> 3 pairs: A .7 .6 .5, B .7 .5 .4; nnU-Net's mean of B keeps c1 (.3): .475
    assert "| kidney (2) | 3 | 0.6000 | 0.5333 | +0.0667 | [" in md and "| kidney (2) | 0.6000 | 0.4750 |" in md
    assert "| 0 | 2 |" in md and "| 1 | 2 |" in md  # per fold rows
    js = json.loads((out_dir / "pgl_compare_Dataset990_Fake.json").read_text())
    fr = js["fractions"][0]
    assert fr["comparison"]["classes"]["1"]["Dice"]["mean_diff"] == pytest.approx(0.05)
    assert js["leakage"][0]["folds"]["0"]["leaked"] == ["c3"] and js["leakage"][0]["found_by"] == ["lookup"]
    assert fr["curves"]["nnUNetTrainerScratch_smoke"]["0"] == {
        "source": "training_log", "train_losses": [-0.1, -0.3], "val_losses": [-0.2, -0.4],
        "ema_fg_dice": pytest.approx([0.6, 0.9 * 0.6 + 0.1 * 0.8])}
    png = (out_dir / "pgl_compare_Dataset990_Fake.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_report_states_no_leakage_and_missing_results_error(tmp_path, monkeypatch, capsys):
    _fake_project(tmp_path, monkeypatch, leak_case="c_not_in_any_fold")
    r = C.compare("Dataset990_Fake", folds=[0, 1], pair=["nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"],
                  n_boot=100, verbose=False)
    assert open(r.markdown).read().split("\n\n")[1].startswith("**Leakage guard: no leakage**")
    with pytest.raises(SystemExit):
        C.main(["-d", "Dataset990_Fake", "--pair", "nnUNetTrainerPGL_smoke", "nnUNetTrainer"])
    err = capsys.readouterr().err
    assert "no paired validation results" in err and "--run" in err


def test_fraction_names_and_missing_variant_message():
    assert J.fraction_suffix(1.0) == "" and J.fraction_suffix(0.1) == "_frac10" and J.fraction_suffix(0.25) == "_frac25"
    with pytest.raises(RS.CompareError, match="in \\(0, 1\\]"):
        J.fraction_suffix(1.5)
    with pytest.raises(RS.CompareError, match="whole percentages"):
        J.fraction_suffix(0.125)
    pairs = J.resolve_trainers(["nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"], [0.5, 1.0])
    assert [c.__name__ for c in pairs[0.5]] == ["nnUNetTrainerPGL_smoke_frac50", "nnUNetTrainerScratch_smoke_frac50"]
    assert J.is_pgl_trainer(pairs[1.0][0]) and not J.is_pgl_trainer(pairs[1.0][1])
    with pytest.raises(RS.CompareError, match="nnUNetTrainerPGL_frac30, which does not exist.*_frac10, _frac25, "
                                             "_frac50"):
        J.resolve_trainers(["nnUNetTrainerPGL", "nnUNetTrainerScratch"], [0.3])


def test_training_jobs_resume_states(tmp_path):
    res = tmp_path / "Dataset990_Fake"
    td = res / "T__nnUNetPlans__3d_fullres"
    (td / "fold_0" / "validation").mkdir(parents=True)
    (td / "fold_0" / "validation" / "summary.json").write_text("{}")
    (td / "fold_1").mkdir()
    (td / "fold_1" / "checkpoint_final.pth").write_bytes(b"x")
    (td / "fold_2").mkdir()
    (td / "fold_2" / "checkpoint_latest.pth").write_bytes(b"x")
    jobs = J.training_jobs(str(res), {1.0: ("T", "U")}, "nnUNetPlans", "3d_fullres", [0, 1, 2, 3])
    states = {(j.trainer, j.fold): j.state for j in jobs}
    assert states == {("T", 1): "val", ("T", 2): "continue", ("T", 3): "train", ("U", 0): "train",
                      ("U", 1): "train", ("U", 2): "train", ("U", 3): "train"}
    assert [(j.trainer, j.fold) for j in jobs][:3] == [("U", 0), ("T", 1), ("U", 1)]  # pairs finish early
    cmd = J.train_command("Dataset990_Fake", "3d_fullres", 2, "T", "nnUNetPlans", "cpu", "continue")
    assert cmd[1:] == ["Dataset990_Fake", "3d_fullres", "2", "-tr", "T", "-p", "nnUNetPlans", "-device", "cpu", "--c"]
    assert J.train_command("D", "c", 1, "T", "P", "cpu", "val")[-1] == "--val"


def test_help_shows_each_default_once():
    text = " ".join(C.build_parser().format_help().split())  # argparse wraps lines to the terminal width
    assert "(default: None)" not in text and "(default: False)" not in text  # no default printed for no default
    for default in ("(default: 3d_fullres)", "(default: nnUNetPlans)", "default: 0 1 2 3 4)",
                    "(default: nnUNetTrainerPGL nnUNetTrainerScratch)", "(default: 1.0)", "(default: cuda)",
                    "(default: $nnUNet_results/<Dataset>/pgl_compare/)", "(default: 10000)", "(default: 0)"):
        assert text.count(default) == 1, default
    assert text.count("(default") == 8  # -f says it at the end of its sentence


# ============================================================================================== label fractions
def test_label_subset_deterministic_nested_and_sized():
    keys = [f"case_{i:03d}" for i in range(37)]
    for fold in range(5):
        s10, s25, s50 = (label_subset(keys, f, fold) for f in (0.1, 0.25, 0.5))
        assert (len(s10), len(s25), len(s50)) == (4, 10, 19)  # ceil(3.7), ceil(9.25), ceil(18.5)
        assert set(s10) <= set(s25) <= set(s50) <= set(keys)
        assert s10 == sorted(s10) and label_subset(list(reversed(keys)), 0.25, fold) == s25  # order-independent
    assert label_subset(keys, 0.25, 0) != label_subset(keys, 0.25, 1)  # another fold, another draw
    assert label_subset(keys[:3], 0.1, 0) and len(label_subset(keys[:3], 0.1, 0)) == 1  # at least one case
    assert label_subset(keys, 1.0, 2) == keys
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        label_subset(keys, 0.0, 0)


@pytest.mark.slow
def test_fraction_do_split_on_planned_dataset(planned, tmp_path, monkeypatch):
    env, _, root = planned
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))  # no PGL checkpoint here; logs go to tmp
    monkeypatch.delenv("nnUNet_pgl_weights", raising=False)
    from nnunet_pgl.trainers import fractions as F
    from nnunet_pgl.pretraining.contract import PGLCheckpointError
    from nnunet_pgl.trainers.pgl import nnUNetTrainerScratch_smoke
    pre = root / "pre" / DATASET
    dataset_json = json.loads((pre / "dataset.json").read_text())

    def make(cls, fold):
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False
        return cls(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))

    for fold in (0, 1):
        base_tr, base_val = make(nnUNetTrainerScratch_smoke, fold).do_split()
        for cls in (F.nnUNetTrainerScratch_smoke_frac50, F.nnUNetTrainerScratch_smoke_frac10):
            tr, val = make(cls, fold).do_split()  # Scratch variants need no checkpoint
            assert list(val) == list(base_val)  # validation unchanged
            assert set(tr) < set(base_tr) and tr == label_subset(base_tr, cls.label_fraction, fold)
            assert make(cls, fold).do_split() == (tr, val)  # deterministic
        assert len(make(F.nnUNetTrainerScratch_smoke_frac50, fold).do_split()[0]) == math.ceil(len(base_tr) / 2)
    with pytest.raises(PGLCheckpointError, match="needs a PGL checkpoint"):
        make(F.nnUNetTrainerPGL_smoke_frac50, 0)


# ============================================================================================== end to end
@pytest.mark.slow
def test_pgl_compare_run_end_to_end(pretrained):
    from test_trainers import clean_env
    env, ckpt_dir, _ = pretrained
    env = clean_env(env)
    cmd = [f"{BIN}/pgl_compare", "-d", "991", "-c", "3d_fullres", "--pair", "nnUNetTrainerPGL_smoke",
           "nnUNetTrainerScratch_smoke", "-f", "0", "--fractions", "0.5", "1.0", "--run", "-device", "cpu",
           "--n-boot", "2000"]
    p = run(cmd, env, timeout=1200)
    res = os.path.join(env["nnUNet_results"], DATASET)
    out = os.path.join(res, "pgl_compare")
    md = open(os.path.join(out, f"pgl_compare_{DATASET}.md")).read()
    assert md in p.stdout
    # pgl_pretrain used every labeled image: every validation case was seen -> the guard says so, per fold
    splits = json.load(open(os.path.join(env["nnUNet_preprocessed"], DATASET, "splits_final.json")))
    for k in (0,):
        n = len(splits[k]["val"])
        assert f"**LEAKAGE: {n} of {n} validation cases of fold {k} were seen in pretraining; rerun pgl_pretrain " \
               f"--exclude-fold {k}**" in md
    js = json.load(open(os.path.join(out, f"pgl_compare_{DATASET}.json")))
    assert [fr["fraction"] for fr in js["fractions"]] == [0.5, 1.0]
    n_val = len(splits[0]["val"])
    for fr in js["fractions"]:
        c = fr["comparison"]
        assert c["n_cases"] == n_val and c["folds_a"] == [0] and c["folds_b"] == [0]
        for s in c["classes"].values():
            assert s["Dice"]["n"] <= n_val and 0 <= s["mean_a"]["Dice"] <= 1  # real numbers from nnU-Net
        for t in fr["trainers"]:
            assert all(fr["curves"][t][k]["source"] == "checkpoint_final.pth" for k in ("0",))
    assert js["leakage"][0]["found_by"] == ["training log"]  # from the fine-tuning logs' PGL init line
    assert js["leakage"][0]["checkpoint"] == str(ckpt_dir / "checkpoint_final.pth")
    assert "## Dice vs labeled fraction" in md and "| 50 % |" in md and "| 100 % |" in md
    # the half-fraction runs trained on half of the training cases, validated on all
    log = open(sorted(__import__("glob").glob(os.path.join(
        res, "nnUNetTrainerScratch_smoke_frac50__nnUNetPlans__3d_fullres", "fold_0", "training_log_*.txt")))[0]).read()
    n_tr = len(splits[0]["train"])
    assert f"Label fraction 0.5: training on {math.ceil(n_tr / 2)} of {n_tr} training cases of fold 0" in log
    assert open(os.path.join(out, f"pgl_compare_{DATASET}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "training run(s) to do" in p.stdout and "[pgl_compare] 1/" in p.stdout
    # resumable: a second --run would train nothing (checked in-process: a subprocess costs ~20 s here)
    pairs = {fr["fraction"]: tuple(fr["trainers"]) for fr in js["fractions"]}
    assert J.training_jobs(res, pairs, "nnUNetPlans", "3d_fullres", [0]) == []
