"""End to end, with stock nnU-Net commands in subprocesses: plan & preprocess → pgl_pretrain (with an unlabeled
folder of NIfTI and NRRD files) → resume with --c → stock nnUNetv2_train -pretrained_weights; plus 2 CPU ranks
under torchrun (gloo) whose weights must stay identical."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

pytestmark = pytest.mark.slow

from conftest import BIN, DATASET, run  # noqa: E402


def test_pretrain_outputs(pretrained):
    env, out, log = pretrained
    for f in ("checkpoint_final.pth", "pgl_config.json", "pgl_log.json", "progress.png"):
        assert (out / f).is_file(), f
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):  # one level up, as nnU-Net writes them
        assert (out.parent / f).is_file(), f
    assert any(f.startswith("training_log_") for f in os.listdir(out))
    assert not (out / "checkpoint_latest.pth").exists()
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=True)  # tensors and builtins only
    w = ckpt["network_weights"]
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in w)
    assert any(k.startswith("decoder.stages.") for k in w) and any(k.startswith("encoder.") for k in w)
    assert all(v.device.type == "cpu" for v in w.values())
    meta = ckpt["pgl_meta"]
    assert meta["plans_identifier"] == "nnUNetPlans" and meta["configuration"] == "3d_fullres"
    assert meta["network_class"].endswith("PlainConvUNet") and meta["num_input_channels"] == 1
    kinds = [c["kind"] for c in meta["cases"]]
    assert kinds.count("labeled") == 6 and kinds.count("unlabeled") == 2
    assert all(len(c["sha256"]) == 64 for c in meta["cases"])
    assert "mean view overlap" in log and "2 regions" in log   # the epoch line; the loader's pairs of regions
    log = json.loads((out / "pgl_log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1]
    for key in ("loss", "level_losses", "lr", "tau", "epoch_time_s", "data_wait_fraction", "views_per_s",
                "mean_overlap"):
        assert key in log[-1]
    assert all(0.1 - 1e-6 <= r["mean_overlap"] <= 1.0 for r in log)   # never below min_overlap
    # the unlabeled cache sits beside nnU-Net's data folder, never inside it
    pre = os.path.join(env["nnUNet_preprocessed"], DATASET)
    assert os.path.isdir(os.path.join(pre, "nnUNetPlans_3d_fullres_pgl_unlabeled"))
    assert not any("unl" in f for f in os.listdir(os.path.join(pre, "nnUNetPlans_3d_fullres")))


def test_resume_continues_from_saved_epoch(pretrained):
    env, out, _ = pretrained
    before = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert before["current_epoch"] == 2
    p = run([f"{BIN}/pgl_pretrain", "-d", "991", "-device", "cpu", "--epochs", "3", "--c"], env)
    after = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert after["current_epoch"] == 3
    log = json.loads((out / "pgl_log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1, 2]  # epochs 0-1 restored from the checkpoint, 2 trained now
    assert "Epoch 2" in p.stdout and "Epoch 0" not in p.stdout
    assert log[2]["loss"] < log[0]["loss"]  # 6 iterations suffice on this dataset (see README)
    cfg = json.loads((out / "pgl_config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["iters_per_epoch"] == 2 and len(cfg["unlabeled_cases"]) == 2


def test_stock_finetune_loads_checkpoint(pretrained):
    env, out, _ = pretrained
    from nnunet_pgl.trainers.discovery import shim_folder
    env = dict(env, nnUNet_extTrainer=shim_folder())
    p = run([f"{BIN}/nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "nnUNetTrainerScratch_smoke", "-device", "cpu",
             "-pretrained_weights", str(out / "checkpoint_final.pth")], env)
    text = p.stdout + p.stderr
    assert "Loading pretrained weights" in text
    assert "decoder.stages.0" in text  # the decoder transfers too


def test_two_cpu_ranks_stay_in_sync(planned):
    env, _, root = planned
    run([f"{BIN}/torchrun", "--standalone", "--nproc_per_node", "2", f"{BIN}/pgl_pretrain", "-d", "991",
         "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--method", "pgl+byol", "--num-workers", "0",
         "--exclude-fold", "0", "--no-probe"],
        dict(env, OMP_NUM_THREADS="1"))
    out = root / "res" / DATASET / "nnUNetPretrainerPGLBYOL__nnUNetPlans__3d_fullres" / "fold_0"  # --exclude-fold 0
    log = json.loads((out / "pgl_log.json").read_text())
    assert log[-1]["ranks_in_sync"] is True
    assert log[-1]["global_loss"] is not None and log[-1]["level_losses"]
    # --exclude-fold 0 created nnU-Net's split and left fold 0's validation cases out
    splits = json.loads((root / "pre" / DATASET / "splits_final.json").read_text())
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=True)
    seen = {c["case_id"] for c in ckpt["pgl_meta"]["cases"] if c["kind"] == "labeled"}
    assert seen == set(splits[0]["train"]) and not seen & set(splits[0]["val"])


def test_bad_dataset_messages(planned, tmp_path):
    env, _, _ = planned
    p = subprocess.run([f"{BIN}/pgl_pretrain", "-d", "555", "-device", "cpu"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "nnUNetv2_plan_and_preprocess -d 555" in p.stderr
    p = subprocess.run([f"{BIN}/pgl_pretrain", "-d", "991", "-p", "NoSuchPlans", "-device", "cpu"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no plans 'NoSuchPlans'" in p.stderr and "nnUNetPlans" in p.stderr
    p = subprocess.run([f"{BIN}/pgl_pretrain", "-d", "991", "-c", "3d_nope", "-device", "cpu"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "configuration '3d_nope'" in p.stderr
    # bad unlabeled input: refused before any output folder exists
    p = subprocess.run([f"{BIN}/pgl_pretrain", "-d", "991", "-device", "cpu", "--unlabeled",
                        "/nonexistent/unlabeled"], env=dict(env, nnUNet_results=str(tmp_path)), capture_output=True,
                       text=True)
    assert p.returncode == 2 and "unlabeled folder '/nonexistent/unlabeled' does not exist" in p.stderr
    assert os.listdir(tmp_path) == []


def test_pgl_probe_checks_the_dataset_like_pgl_pretrain(planned):
    """pgl_probe shares pgl_pretrain's dataset checks and messages, but does not need $nnUNet_results."""
    env, _, _ = planned
    for args, expected in ((["-d", "555"], "nnUNetv2_plan_and_preprocess -d 555"),
                           (["-d", "991", "-p", "NoSuchPlans"], "no plans 'NoSuchPlans'"),
                           (["-d", "991", "-c", "3d_nope"], "configuration '3d_nope' is not in plans")):
        p = subprocess.run([f"{BIN}/pgl_probe", *args, "-device", "cpu", "random"], env=env, capture_output=True,
                           text=True)
        assert p.returncode == 2 and p.stderr.startswith("pgl_probe: error: ") and expected in p.stderr, p.stderr
    no_results = {k: v for k, v in env.items() if k != "nnUNet_results"}
    p = subprocess.run([f"{BIN}/pgl_probe", "-d", "991", "-c", "2d", "-device", "cpu", "random"], env=no_results,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "configuration '2d' is 2D" in p.stderr and "nnUNet_results" not in p.stderr
