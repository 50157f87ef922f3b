"""One pretraining, many datasets: the plans check's warnings (target spacing, CT normalisation) and refusals
(architecture), pgl_transfer's refusals before it writes anything, and end to end on CPU: two synthetic datasets of
different shapes, pretraining on A plus B's images, pgl_transfer to B, fine-tuning B with the smoke trainer (no
environment variable: the record finds the checkpoint) and a prediction."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import BIN, DATASET, run

from nnunet_pgl.pretraining.contract import PGLCheckpointError, check_pgl_meta
from nnunet_pgl.trainers.transfer import TransferError, transfer


def _plans_and_meta(data_dir):
    plans = json.loads((data_dir / "plans_plain.json").read_text())
    dataset_json = json.loads((data_dir / "dataset.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_pgl.pretraining.contract import plans_meta
    return plans, dataset_json, plans_meta(PlansManager(plans), "3d_fullres", 1)


# ----------------------------------------------------------------------------------------- fast, in-process
def test_plans_check_warns_on_spacing_and_ct_statistics(data_dir):
    plans, dataset_json, meta = _plans_and_meta(data_dir)
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert meta["ct_normalization"] == {"0": {k: props[k] for k in ("percentile_00_5", "percentile_99_5", "mean",
                                                                     "std")}}
    assert check_pgl_meta({"pgl_meta": meta}, "x.pth", plans, "3d_fullres", dataset_json) == []
    other = dict(meta, spacing=[3.0, 0.8, 0.8], plans_identifier="SrcPlans", dataset_name="Dataset980_Src",
                 ct_normalization={"0": {"percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "mean": 40.0,
                                         "std": 350.5}})
    w = check_pgl_meta({"pgl_meta": other}, "x.pth", plans, "3d_fullres", dataset_json)
    here = plans["configurations"]["3d_fullres"]["spacing"]
    assert w[0] == (f"target spacing [3, 0.8, 0.8] in the PGL checkpoint (plans 'SrcPlans' of Dataset980_Src) but "
                    f"[{', '.join(f'{s:.6g}' for s in here)}] here (plans 'nnUNetPlans' of Dataset990_PGLSynth): the "
                    "network sees other voxel sizes than it was pretrained on")
    assert w[1].startswith("CT normalisation of channel 0: clip [-1000, 1500], mean 40, std 350.5 in the PGL "
                           f"checkpoint (plans 'SrcPlans' of Dataset980_Src) but clip [{props['percentile_00_5']:.6g}, "
                           f"{props['percentile_99_5']:.6g}], mean {props['mean']:.6g}, std {props['std']:.6g} here")
    assert len(w) == 2
    # a checkpoint from before these fields: nothing to compare, no warning
    old = {k: v for k, v in meta.items() if k != "ct_normalization"}
    assert check_pgl_meta({"pgl_meta": old}, "x.pth", plans, "3d_fullres", dataset_json) == []
    # the architecture still refuses, whatever else differs
    with pytest.raises(PGLCheckpointError, match="'patch_size' is"):
        check_pgl_meta({"pgl_meta": dict(other, patch_size=[16, 64, 64])}, "x.pth", plans, "3d_fullres", dataset_json)


def _fake_dirs(tmp_path, monkeypatch, data_dir, b_channels):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(k, str(tmp_path / k))
    plans = json.loads((data_dir / "plans_plain.json").read_text())
    pre_a = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"]
    pre_a.mkdir()
    (pre_a / "nnUNetPlans.json").write_text(json.dumps(plans))
    shutil.copy(data_dir / "dataset.json", pre_a / "dataset.json")
    raw_b = tmp_path / "nnUNet_raw" / "Dataset995_Other"
    raw_b.mkdir()
    (raw_b / "dataset.json").write_text(json.dumps({"channel_names": b_channels, "labels": {"background": 0, "x": 1},
                                                    "numTraining": 5, "file_ending": ".nii.gz"}))
    return plans["dataset_name"]


def test_transfer_refusals_write_nothing(tmp_path, monkeypatch, data_dir):
    a = _fake_dirs(tmp_path, monkeypatch, data_dir, {"0": "CT", "1": "CT"})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(TransferError, match="has 1 input channel.* but Dataset995_Other has 2"):
        transfer(a, "995")
    with pytest.raises(TransferError, match="no plans 'nnUNetResEncUNetMPlans'.*nnUNetv2_plan_and_preprocess"):
        transfer(a, "995", plans="nnUNetResEncUNetMPlans")
    with pytest.raises(TransferError, match="configuration '3d_lowres' is not in"):
        transfer(a, "995", configuration="3d_lowres")
    with pytest.raises(TransferError, match="same dataset"):
        transfer(a, a)
    with pytest.raises(TransferError, match="target dataset 996 is in none of"):
        transfer(a, "996")
    (tmp_path / "nnUNet_raw" / "Dataset995_Other" / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "numTraining": 5,
         "file_ending": ".nii.gz"}))
    with pytest.raises(TransferError, match="must not contain '__'"):
        transfer(a, "995", target_plans="a__b")
    # B already has plans of that name from another dataset: not overwritten
    os.makedirs(tmp_path / "nnUNet_preprocessed" / "Dataset995_Other")
    other = tmp_path / "nnUNet_preprocessed" / "Dataset995_Other" / f"nnUNetPlans_{a}.json"
    other.write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [8, 8, 8]}}}))
    with pytest.raises(TransferError, match="exists and is not .* current plans 'nnUNetPlans'.*-tp"):
        transfer(a, "995")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == sorted(before + [str(other.parent), str(other)])


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_one_pretraining_two_datasets_end_to_end(planned, tmp_path):
    """A = the planned dataset (24×48×48), B = another synthetic dataset (20×40×56, other spacing), own folders."""
    from nnunet_pgl.demo.synthetic import make_dataset
    from test_trainers import clean_env
    env0, _, root = planned
    env = dict(env0)
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        env[k] = str(tmp_path / sub)
    shutil.copytree(root / "raw" / DATASET, tmp_path / "raw" / DATASET)
    shutil.copytree(root / "pre" / DATASET, tmp_path / "pre" / DATASET,
                    ignore=lambda d, names: [n for n in names if n.endswith("_pgl_unlabeled")])
    make_dataset(env["nnUNet_raw"], dataset_id=993, name="PGLXfer", num_train=5, shape=(20, 40, 56),
                     spacing=(3.0, 0.9, 0.9), seed=11)
    b_name = "Dataset993_PGLXfer"
    images_b = os.path.join(env["nnUNet_raw"], b_name, "imagesTr")

    # one pretraining on A's images plus B's raw imagesTr folder
    run([f"{BIN}/pgl_pretrain", "-d", "991", "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "1",
         "--batch-size", "1", "--num-workers", "0", "--no-probe", "-np", "1", "--unlabeled", images_b], env)
    ckpt = tmp_path / "res" / DATASET / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    assert ckpt.is_file()

    p = run([f"{BIN}/pgl_transfer", "-s", "991", "-t", "993", "-np", "1"], env)
    tp = f"nnUNetPlans_{DATASET}"
    assert f"Fine-tune: nnUNetv2_train {b_name} 3d_fullres FOLD -tr nnUNetTrainerPGL -p {tp}" in p.stdout
    plans_a = json.loads((tmp_path / "pre" / DATASET / "nnUNetPlans.json").read_text())
    plans_b = json.loads((tmp_path / "pre" / b_name / f"{tp}.json").read_text())
    ca, cb = plans_a["configurations"]["3d_fullres"], plans_b["configurations"]["3d_fullres"]
    assert cb["patch_size"] == ca["patch_size"] and cb["spacing"] == ca["spacing"]
    assert cb["architecture"] == ca["architecture"] and plans_b["dataset_name"] == b_name
    assert len([f for f in os.listdir(tmp_path / "pre" / b_name / cb["data_identifier"]) if f.endswith(".b2nd")
                and not f.endswith("_seg.b2nd")]) == 5
    record_file = tmp_path / "res" / b_name / f"pgl_transfer__{tp}__3d_fullres.json"
    record = json.loads(record_file.read_text())
    assert {k: record[k] for k in ("source_dataset", "source_plans", "configuration", "target_dataset",
                                   "target_plans")} == {"source_dataset": DATASET, "source_plans": "nnUNetPlans",
                                                        "configuration": "3d_fullres", "target_dataset": b_name,
                                                        "target_plans": tp}
    assert str(tmp_path) not in record_file.read_text()  # names only: another mount of nnUNet_results finds it

    # fine-tune B from a shell without nnUNet_pgl_weights: the record leads to A's checkpoint
    ft = run([f"{BIN}/nnUNetv2_train", "993", "3d_fullres", "0", "-tr", "nnUNetTrainerPGL_smoke", "-p", tp,
              "-device", "cpu"], clean_env(env))
    text = ft.stdout + ft.stderr
    assert f"PGL checkpoint {ckpt}, chosen: transferred: {record_file} (written by pgl_transfer)" in text
    assert f"PGL initialisation from {ckpt}: loaded" in text
    assert "WARNING" not in text[text.index("PGL checkpoint"):text.index("PGL initialisation from")]  # A's plans

    out, inp = tmp_path / "pred", tmp_path / "in"
    inp.mkdir()
    os.symlink(os.path.join(images_b, "case_000_0000.nii.gz"), inp / "case_000_0000.nii.gz")
    run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", "993", "-p", tp, "-c", "3d_fullres", "-f",
         "0", "-tr", "nnUNetTrainerPGL_smoke", "-device", "cpu", "-npp", "1", "-nps", "1"], clean_env(env))
    import SimpleITK as sitk
    pred = sitk.ReadImage(str(out / "case_000.nii.gz"))
    src = sitk.ReadImage(os.path.join(images_b, "case_000_0000.nii.gz"))
    assert pred.GetSize() == src.GetSize() == (56, 40, 20) and pred.GetSpacing() == pytest.approx(src.GetSpacing())
