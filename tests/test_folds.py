"""Per-fold pretraining and the fine-tuning trainers' checkpoint choice: the order ($nnUNet_pgl_weights, fold_K,
fold_all with a leakage warning, a pgl_transfer record) and the reasons the log gives; a fresh start loads the PGL
weights whatever flag led to it (also ``--c`` without a checkpoint of the run), while the run's own checkpoint wins
when nnU-Net loads one; ``pgl_pretrain --folds`` end to end (resumable), after which pgl_compare's leakage guard is
clean on every fold."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import BIN, DATASET, run

from nnunet_pgl.pretraining.contract import PGLCheckpointError, choose_pgl_checkpoint

PGL_DIR = "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres"


def touch(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    return str(path)


# ----------------------------------------------------------------------------------------- fast, in-process
def test_checkpoint_choice_order_and_reasons(tmp_path, monkeypatch):
    res = tmp_path / "res"
    monkeypatch.setenv("nnUNet_results", str(res))
    monkeypatch.delenv("nnUNet_pgl_weights", raising=False)
    plans = {"dataset_name": "Dataset990_Fake", "plans_name": "nnUNetPlans"}
    own = res / "Dataset990_Fake" / PGL_DIR

    def choose(fold, pretrainer="nnUNetPretrainerPGL"):
        return choose_pgl_checkpoint(plans, "3d_fullres", fold, pretrainer)

    with pytest.raises(PGLCheckpointError, match="nnUNetTrainerPGL needs a PGL checkpoint, and the pgl_pretrain output "
                       + str(own / "fold_all" / "checkpoint_final.pth") + " does not exist .*there is no pretraining "
                       "for fold 2.* Run: pgl_pretrain -d Dataset990_Fake -c 3d_fullres -p nnUNetPlans, or "
                       "pgl_pretrain .* --folds 0 1 2 3 4 .*pgl_transfer -s SOURCE -t Dataset990_Fake"):
        choose(2)

    # 4. a pgl_transfer record: the source dataset's fold_all, by dataset name and plans (no path in the record)
    record = res / "Dataset990_Fake" / "pgl_transfer__nnUNetPlans__3d_fullres.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"source_dataset": "Dataset980_Src", "source_plans": "SrcPlans",
                                  "configuration": "3d_fullres"}))
    with pytest.raises(PGLCheckpointError, match="written by pgl_transfer.*Dataset980_Src.*Run: pgl_pretrain -d "
                                                 "Dataset980_Src -c 3d_fullres -p SrcPlans"):
        choose(2)
    src = touch(res / "Dataset980_Src" / "nnUNetPretrainerPGL__SrcPlans__3d_fullres" / "fold_all" /
                "checkpoint_final.pth")
    c = choose(2)
    assert (c.path, c.source, c.fallback) == (src, "transferred", False) and str(record) in c.why
    with pytest.raises(PGLCheckpointError, match="--method byol"):  # each method has its own pretraining
        choose(2, "nnUNetPretrainerBYOL")

    # 3. the dataset's own fold_all wins over the record; for fold K it is a fallback (leakage warning)
    fold_all = touch(own / "fold_all" / "checkpoint_final.pth")
    c = choose(2)
    assert (c.path, c.source, c.fallback) == (fold_all, "fold_all", True)
    assert "there is no pretraining for fold 2" in c.why
    c = choose("all")
    assert (c.path, c.source, c.fallback) == (fold_all, "fold_all", False)
    touch(own / "fold_2" / "checkpoint_latest.pth")  # a fold-2 pretraining still running or killed
    c = choose(2)
    assert c.source == "fold_all" and c.fallback and "unfinished" in c.why and "--exclude-fold 2 --c" in c.why

    # 2. fold_K for fold K, and only for fold K
    fold2 = touch(own / "fold_2" / "checkpoint_final.pth")
    c = choose(2)
    assert (c.path, c.source, c.fallback) == (fold2, "fold_2", False) and "left fold 2's validation cases out" in c.why
    assert choose(3).source == "fold_all" and choose("all").path == fold_all

    # 1. the environment variable overrides everything; a wrong one is an error, not a silent fallback
    monkeypatch.setenv("nnUNet_pgl_weights", str(tmp_path / "nope.pth"))
    with pytest.raises(PGLCheckpointError, match="nnUNet_pgl_weights=.*nope.pth does not exist"):
        choose(2)
    elsewhere = touch(tmp_path / "elsewhere.pth")
    monkeypatch.setenv("nnUNet_pgl_weights", elsewhere)
    c = choose(2)
    assert (c.path, c.source) == (elsewhere, "environment variable")
    monkeypatch.delenv("nnUNet_pgl_weights")

    os.remove(fold_all)
    record.write_text("{not json")
    with pytest.raises(PGLCheckpointError, match="cannot read the pgl_transfer record .*Run pgl_transfer again"):
        choose(3)


def _plans(data_dir):
    plans = json.loads((data_dir / "plans_plain.json").read_text())
    plans["continue_training"] = False
    return plans, json.loads((data_dir / "dataset.json").read_text())


def test_pretrainer_fold_is_the_excluded_fold(data_dir, tmp_path, monkeypatch):
    """fold_K of a pretrainer leaves out fold K's validation cases: nnU-Net's fold argument sets --exclude-fold, and
    a configuration that excludes another fold is refused (fold_K would be trusted for fold K)."""
    from nnunet_pgl.pretraining.config import CONFIG_ENV, PretrainConfig
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL
    for k, v in (("nnUNet_results", tmp_path / "res"), ("nnUNet_preprocessed", tmp_path / "pre")):
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    plans, dataset_json = _plans(data_dir)
    t = nnUNetPretrainerPGL(dict(plans), "3d_fullres", 3, dataset_json, device=torch.device("cpu"))
    assert t.pgl_config.exclude_fold == 3 and t.output_folder.endswith("fold_3")
    assert nnUNetPretrainerPGL(dict(plans), "3d_fullres", "all", dataset_json,
                               device=torch.device("cpu")).pgl_config.exclude_fold is None
    cfg_file = tmp_path / "pgl_config.json"
    PretrainConfig(exclude_fold=1).save(str(cfg_file))
    monkeypatch.setenv(CONFIG_ENV, str(cfg_file))
    with pytest.raises(ValueError, match="excludes fold 1 but the run writes fold_3"):
        nnUNetPretrainerPGL(dict(plans), "3d_fullres", 3, dataset_json, device=torch.device("cpu"))


def test_folds_flag_refusals(capsys):
    from nnunet_pgl.pretraining import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["-d", "991", "--folds", "0", "1", "--exclude-fold", "0"])
    assert e.value.code == 2 and "--folds and --exclude-fold exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["-d", "991", "--folds", "-1"])
    assert "folds are numbered from 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- planned dataset
def write_pgl_checkpoint(path, plans: dict, dataset_json: dict, seed: int) -> dict:
    """A PGL checkpoint as pgl_pretrain writes it for these plans (network weights + pgl_meta), random weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_pgl.pretraining.contract import build_meta
    pm = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, pm.get_label_manager(dataset_json).num_segmentation_heads)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"network_weights": weights, "pgl_meta": build_meta(pm, "3d_fullres", 1, "pgl", [2, 3], [])}, path)
    return weights


def pgl_lines(folder) -> int:
    return sum(open(p).read().count("PGL initialisation from") for p in glob.glob(str(folder / "training_log_*.txt")))


@pytest.mark.slow
def test_continue_without_own_checkpoint_initialises_from_pgl(planned, tmp_path, monkeypatch):
    """nnUNetv2_train ... --c when the run has no checkpoint yet: nnU-Net starts fresh, and so must the PGL
    initialisation (nnU-Net's own get_trainer_from_args / maybe_load_checkpoint / on_train_start, in-process). With a
    checkpoint of the run, --c loads it and PGL loads nothing; --val needs no PGL checkpoint at all."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    env, _, root = planned
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(k, env[k])
    res = tmp_path / "res"
    monkeypatch.setenv("nnUNet_results", str(res))
    monkeypatch.delenv("nnUNet_pgl_weights", raising=False)
    pre = root / "pre" / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    ckpt = res / DATASET / PGL_DIR / "fold_all" / "checkpoint_final.pth"
    weights = write_pgl_checkpoint(str(ckpt), plans, dataset_json, seed=7)
    out = res / DATASET / "nnUNetTrainerPGL_smoke__nnUNetPlans__3d_fullres" / "fold_4"
    cpu = torch.device("cpu")

    t = get_trainer_from_args("991", "3d_fullres", 4, "nnUNetTrainerPGL_smoke", continue_training=True, device=cpu)
    maybe_load_checkpoint(t, True, False, None)  # no checkpoint of this run: nnU-Net starts a new training
    t.on_train_start()
    log = open(t.log_file).read()
    assert f"PGL initialisation from {ckpt}: loaded" in log and f"PGL checkpoint {ckpt}, chosen: fold_all" in log
    w = t.network.state_dict()
    assert torch.equal(w["encoder.stages.0.0.convs.0.conv.weight"], weights["encoder.stages.0.0.convs.0.conv.weight"])
    with torch.no_grad():  # the run's own progress, which --c must keep
        t.network.encoder.stages[0][0].convs[0].conv.weight.add_(1.0)
    t.save_checkpoint(str(out / "checkpoint_latest.pth"))
    own = t.network.state_dict()["encoder.stages.0.0.convs.0.conv.weight"].clone()
    n_init = pgl_lines(out)

    t = get_trainer_from_args("991", "3d_fullres", 4, "nnUNetTrainerPGL_smoke", continue_training=True, device=cpu)
    maybe_load_checkpoint(t, True, False, None)  # --c with a checkpoint: it wins
    t.on_train_start()
    assert torch.equal(t.network.state_dict()["encoder.stages.0.0.convs.0.conv.weight"], own)
    assert pgl_lines(out) == n_init

    # --val of a finished run: loads its checkpoint_final, no PGL checkpoint needed (it is gone here)
    shutil.copy(out / "checkpoint_latest.pth", out / "checkpoint_final.pth")
    os.remove(ckpt)
    t = get_trainer_from_args("991", "3d_fullres", 4, "nnUNetTrainerPGL_smoke", continue_training=False, device=cpu)
    maybe_load_checkpoint(t, False, True, None)
    assert torch.equal(t.network.state_dict()["encoder.stages.0.0.convs.0.conv.weight"], own)
    # ... but a plain rerun of it starts fresh, and a fresh start without a PGL checkpoint is refused
    t = get_trainer_from_args("991", "3d_fullres", 4, "nnUNetTrainerPGL_smoke", continue_training=False, device=cpu)
    with pytest.raises(PGLCheckpointError, match="needs a PGL checkpoint"):
        t.initialize()
    # --c on a fold without any checkpoint and no PGL checkpoint: refused before nnU-Net creates the output folder
    with pytest.raises(PGLCheckpointError, match="needs a PGL checkpoint"):
        get_trainer_from_args("991", "3d_fullres", 3, "nnUNetTrainerPGL_smoke", continue_training=True, device=cpu)
    assert not (out.parent / "fold_3").exists()


@pytest.mark.slow
def test_folds_pretraining_then_leakage_guard_is_clean(planned, tmp_path, monkeypatch):
    """pgl_pretrain --folds 0 1 2 3 4: one pretraining per fold in fold_K (each without fold K's validation cases),
    resumable; nnUNetTrainerPGL_smoke on fold 1 uses fold_1 and says why; pgl_compare's guard finds no leakage."""
    env, _, root = planned
    env = dict(env, nnUNet_results=str(tmp_path / "res"))
    env.pop("nnUNet_pgl_weights", None)
    cmd = [f"{BIN}/pgl_pretrain", "-d", "991", "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "1",
           "--batch-size", "1", "--num-workers", "0", "--no-probe", "--folds", "0", "1", "2", "3", "4"]
    run(cmd, env)
    base = tmp_path / "res" / DATASET / PGL_DIR
    splits = json.loads((root / "pre" / DATASET / "splits_final.json").read_text())
    assert sorted(os.listdir(base)) == ["dataset.json", "dataset_fingerprint.json", "fold_0", "fold_1", "fold_2",
                                        "fold_3", "fold_4", "plans.json"]  # no fold_all
    for k in range(5):
        ck = torch.load(base / f"fold_{k}" / "checkpoint_final.pth", weights_only=True)
        seen = {c["case_id"] for c in ck["pgl_meta"]["cases"] if c["kind"] == "labeled"}
        assert seen == set(splits[k]["train"]), k
        assert ck["pgl_config"]["exclude_fold"] == k
    # killed in fold 4 (only its latest checkpoint left): the same command skips 0-3 and resumes 4
    os.rename(base / "fold_4" / "checkpoint_final.pth", base / "fold_4" / "checkpoint_latest.pth")
    p = run(cmd, env)
    for k in range(4):
        assert (f"pgl_pretrain --folds: fold {k} ({k + 1}/5): finished ({base / f'fold_{k}' / 'checkpoint_final.pth'})"
                ", skipped") in p.stdout
    assert "fold 4 (5/5): resuming from checkpoint_latest.pth" in p.stdout and "Epoch 0" not in p.stdout
    assert (base / "fold_4" / "checkpoint_final.pth").is_file()

    # fine-tune fold 1 (one validation case: the shortest final validation): fold_1 is chosen, the log says why
    from test_trainers import clean_env
    ft = run([f"{BIN}/nnUNetv2_train", "991", "3d_fullres", "1", "-tr", "nnUNetTrainerPGL_smoke", "-device", "cpu"],
             clean_env(env))
    text = ft.stdout + ft.stderr
    fold1 = base / "fold_1" / "checkpoint_final.pth"
    assert f"PGL checkpoint {fold1}, chosen: fold_1, the pretraining for fold 1" in text
    assert "WARNING: leakage" not in text

    # pgl_compare over all five folds: fold 1 read from its training log, the others by the trainer's choice now.
    # The baseline arm is a copy of fold 1's validation summary (the guard looks only at PGL arms).
    res = tmp_path / "res" / DATASET
    val = res / "nnUNetTrainerPGL_smoke__nnUNetPlans__3d_fullres" / "fold_1" / "validation" / "summary.json"
    twin = res / "nnUNetTrainerScratch_smoke__nnUNetPlans__3d_fullres" / "fold_1" / "validation"
    twin.mkdir(parents=True)
    shutil.copy(val, twin / "summary.json")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    from nnunet_pgl.evaluation import compare as C
    r = C.compare("991", pair=["nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"], n_boot=100, verbose=False)
    n_val = sum(len(s["val"]) for s in splits)
    assert r.leakage_lines == [next(ln for ln in r.leakage_lines if ln.startswith("**Leakage guard: no leakage"))]
    assert f"none of the {n_val} validation cases of folds 0 1 2 3 4 was seen in pretraining" in r.leakage_lines[0]
    by_ckpt = {e.checkpoint: e for e in r.leakage}
    assert set(by_ckpt) == {str(base / f"fold_{k}" / "checkpoint_final.pth") for k in range(5)}
    for k in range(5):
        e = by_ckpt[str(base / f"fold_{k}" / "checkpoint_final.pth")]
        assert list(e.folds) == [k] and e.found_by == (["training log"] if k == 1 else ["lookup"])
