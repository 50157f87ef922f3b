"""Fine-tuning trainers: zero-config discovery by stock nnU-Net commands in a clean environment, PGL init and its
load report, the pgl_meta check (refusal before any output folder exists), 5-fold smoke training followed by
nnUNetv2_find_best_configuration, and prediction."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import BIN, DATASET, run

from nnunet_pgl.pretraining.contract import PGLCheckpointError, check_pgl_meta, read_pgl_checkpoint
from nnunet_pgl.trainers.pgl import WarmupPolyLRScheduler


def clean_env(env):
    """Only what a user's fresh shell has: PATH, HOME and nnU-Net's three folders (plus CPU-friendly settings)."""
    keep = {k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    return dict(keep, PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=os.environ.get("HOME", "/root"),
                nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2")


def train(env, fold, trainer, *extra):
    return run([f"{BIN}/nnUNetv2_train", "991", "3d_fullres", str(fold), "-tr", trainer, "-device", "cpu", *extra],
               env)


# ----------------------------------------------------------------------------------------- fast, in-process
def test_warmup_poly_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupPolyLRScheduler(opt, 1e-2, 1000, 10)
    lrs = []
    for e in range(1000):
        s.step(e)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-2 / 11) and lrs[9] == pytest.approx(1e-2 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-2)  # peak right after warm-up, then poly decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def _plans_and_meta(data_dir):
    plans = json.loads((data_dir / "plans_plain.json").read_text())
    dataset_json = json.loads((data_dir / "dataset.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_pgl.pretraining.contract import plans_meta
    meta = plans_meta(PlansManager(plans), "3d_fullres", 1)
    return plans, dataset_json, meta


@pytest.mark.parametrize("field,value", [
    ("patch_size", [16, 64, 64]),
    ("num_input_channels", 2),
    ("normalization_schemes", ["ZScoreNormalization"]),
    ("network_class", "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"),
    ("architecture_fingerprint", "0" * 64),
])
def test_meta_mismatch_names_field_and_fix(data_dir, field, value):
    plans, dataset_json, meta = _plans_and_meta(data_dir)
    check_pgl_meta({"pgl_meta": meta}, "x.pth", plans, "3d_fullres", dataset_json)  # matching: no error
    bad = dict(meta, **{field: value})
    with pytest.raises(PGLCheckpointError, match=f"'{field}' is .* pgl_pretrain -d {plans['dataset_name']} -c "
                                                 f"3d_fullres -p nnUNetPlans"):
        check_pgl_meta({"pgl_meta": bad}, "x.pth", plans, "3d_fullres", dataset_json)


def test_meta_mismatch_fix_names_the_callers_method(data_dir):
    """A BYOL fine-tuning trainer's message gives the pgl_pretrain command that writes the folder it reads."""
    plans, dataset_json, meta = _plans_and_meta(data_dir)
    with pytest.raises(PGLCheckpointError, match="pgl_pretrain -d .* -p nnUNetPlans --method byol"):
        check_pgl_meta({"pgl_meta": dict(meta, patch_size=[16, 64, 64])}, "x.pth", plans, "3d_fullres", dataset_json,
                       "nnUNetPretrainerBYOL")


def test_plain_nnunet_checkpoint_refused(data_dir):
    plans, dataset_json, _ = _plans_and_meta(data_dir)
    with pytest.raises(PGLCheckpointError, match="not a PGL checkpoint .*nnUNetTrainer.*-pretrained_weights"):
        check_pgl_meta({"network_weights": {}, "trainer_name": "nnUNetTrainer"}, "x.pth", plans, "3d_fullres",
                       dataset_json)


def test_truncated_checkpoint_refused(tmp_path):
    p = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(1000)}, "pgl_meta": {}}, p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(PGLCheckpointError, match="cannot read the PGL checkpoint .*truncated.*pgl_pretrain"):
        read_pgl_checkpoint(str(p))


# ----------------------------------------------------------------------------------------- stock commands
@pytest.mark.slow
def test_stock_train_finds_pgl_trainer_in_clean_shell_and_loads_weights(pretrained):
    env, ckpt_dir, _ = pretrained
    env = clean_env(env)
    assert "nnUNet_extTrainer" not in env  # found through the interpreter-start hook alone
    p = train(env, 0, "nnUNetTrainerPGL_smoke")
    log = p.stdout + p.stderr
    assert "PGL initialisation from" in log and str(ckpt_dir / "checkpoint_final.pth") in log
    assert "skipped" in log and "segmentation-layer tensors" in log
    out = os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerPGL_smoke__nnUNetPlans__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(out, "validation", "summary.json"))
    # --val re-runs validation from the run's own checkpoint and does not re-initialise from PGL
    p = run([f"{BIN}/nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "nnUNetTrainerPGL_smoke", "-device", "cpu",
             "--val"], env)
    assert "PGL initialisation" not in p.stdout + p.stderr


@pytest.mark.slow
def test_predict_with_pgl_trainer(pretrained, planned, tmp_path):
    env, _, _ = pretrained
    root = planned[2]
    env = clean_env(env)
    fold0 = os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerPGL_smoke__nnUNetPlans__3d_fullres", "fold_0")
    if not os.path.isfile(os.path.join(fold0, "checkpoint_final.pth")):
        train(env, 0, "nnUNetTrainerPGL_smoke")
    src = root / "raw" / DATASET / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(src / "case_000_0000.nii.gz", inp / "case_000_0000.nii.gz")
    run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", "991", "-c", "3d_fullres",
         "-f", "0", "-tr", "nnUNetTrainerPGL_smoke", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert (tmp_path / "out" / "case_000.nii.gz").is_file()


@pytest.mark.slow
def test_mismatched_checkpoint_refused_before_output_folder(pretrained):
    env, ckpt_dir, root = pretrained
    env = clean_env(env)
    run([f"{BIN}/nnUNetv2_plan_experiment", "-d", "991", "-pl", "nnUNetPlannerResEncM"],
        {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"})
    res_dir = os.path.join(env["nnUNet_results"], DATASET, "nnUNetTrainerPGL_1epochs__nnUNetResEncUNetMPlans__3d_fullres")
    cmd = [f"{BIN}/nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "nnUNetTrainerPGL_1epochs", "-p",
           "nnUNetResEncUNetMPlans", "-device", "cpu"]
    # no checkpoint for these plans: says which command makes one
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode != 0
    assert "pgl_pretrain -d Dataset991_PGLE2E -c 3d_fullres -p nnUNetResEncUNetMPlans" in p.stderr
    # a checkpoint pretrained on the plain plans: refused, naming the differing field
    p = subprocess.run(cmd, env=dict(env, nnUNet_pgl_weights=str(ckpt_dir / "checkpoint_final.pth")),
                       capture_output=True, text=True)
    assert p.returncode != 0 and "PGLCheckpointError" in p.stderr
    assert "'network_class' is" in p.stderr and "ResidualEncoderUNet" in p.stderr
    assert not os.path.exists(res_dir)  # nothing written


@pytest.mark.slow
def test_cross_validation_smoke_and_find_best_configuration(pretrained):
    """Folds 0-1 of the smoke pair, then stock find_best_configuration over both trainers (the suite keeps to 2 folds
    for time; all 5 folds were run by hand, see BENCHMARKS.md)."""
    env, _, _ = pretrained
    env = clean_env(env)
    res = os.path.join(env["nnUNet_results"], DATASET)
    folds = ["0", "1"]
    for trainer in ("nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"):
        for fold in folds:
            if not os.path.isfile(os.path.join(res, f"{trainer}__nnUNetPlans__3d_fullres", f"fold_{fold}",
                                               "validation", "summary.json")):
                train(env, fold, trainer)
    p = run([f"{BIN}/nnUNetv2_find_best_configuration", "991", "-c", "3d_fullres", "-tr", "nnUNetTrainerPGL_smoke",
             "nnUNetTrainerScratch_smoke", "--disable_ensembling", "-np", "1", "-f", *folds], env)
    assert os.path.isfile(os.path.join(res, "inference_information.json"))
    info = json.loads(open(os.path.join(res, "inference_information.json")).read())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] in (
        "nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke")
    assert "nnUNetv2_predict" in p.stdout + open(os.path.join(res, "inference_instructions.txt")).read()
