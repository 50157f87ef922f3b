"""``pgl_demo``: preset and flag resolution, the --out rules, the report from nnU-Net's summary.json, the stage
runner (with stand-in commands), and one slow end-to-end run with stock nnU-Net commands and tiny schedules."""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from typing import Dict, List

import pytest

from conftest import write_summary

from nnunet_pgl.demo import cli, config, report, stages
from nnunet_pgl.demo.synthetic import LABELS

BIN = os.path.dirname(sys.executable)


def resolve(argv: List[str], cuda: bool = False) -> config.DemoConfig:
    return config.resolve(cli.build_parser().parse_args(argv), cuda_available=cuda,
                        now=datetime.datetime(2026, 1, 2, 3, 4, 5))


def flag_value(cmd: List[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# ------------------------------------------------------------------------------------- presets and flags
def test_cpu_preset_is_the_default_without_cuda(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve([])
    assert cfg.preset == "cpu" and cfg.device == "cpu"
    assert (cfg.pgl_trainer, cfg.scratch_trainer) == ("nnUNetTrainerPGL_demo", "nnUNetTrainerScratch_demo")
    assert cfg.out == str(tmp_path / "pgl_demo_20260102_030405")
    cpu = config.PRESETS["cpu"]
    assert (cfg.cases, cfg.unlabeled, cfg.pretrain_epochs, cfg.pretrain_iters) == (
        cpu.cases, cpu.unlabeled, cpu.pretrain_epochs, cpu.pretrain_iters)
    cmds = stages.stage_commands(cfg, bin_dir="/venv/bin")
    assert cmds["plan_and_preprocess"] == ["/venv/bin/nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "3d_fullres",
                                           "-npfp", "2", "-np", "2"]
    assert flag_value(cmds["pretrain"], "-device") == "cpu"
    assert flag_value(cmds["finetune_pgl"], "-tr") == "nnUNetTrainerPGL_demo"


def test_gpu_preset_is_the_default_with_cuda():
    cfg = resolve(["--out", "x"], cuda=True)
    gpu = config.PRESETS["gpu"]
    assert cfg.preset == "gpu" and cfg.device == "cuda"
    assert (cfg.pgl_trainer, cfg.scratch_trainer) == ("nnUNetTrainerPGL_50epochs", "nnUNetTrainerScratch_50epochs")
    assert cfg.cases > config.PRESETS["cpu"].cases and cfg.pretrain_epochs > config.PRESETS["cpu"].pretrain_epochs
    assert cfg.shape == list(gpu.shape)
    cmds = stages.stage_commands(cfg, bin_dir="/b")
    for stage in ("finetune_pgl", "finetune_scratch"):
        assert cmds[stage][:4] == ["/b/nnUNetv2_train", "990", "3d_fullres", "0"]
        assert flag_value(cmds[stage], "-device") == "cuda"
    assert flag_value(cmds["finetune_scratch"], "-tr") == "nnUNetTrainerScratch_50epochs"
    p = cmds["pretrain"]
    assert flag_value(p, "-device") == "cuda" and flag_value(p, "--epochs") == str(gpu.pretrain_epochs)
    assert flag_value(p, "--iters-per-epoch") == str(gpu.pretrain_iters)
    env = stages.demo_env(cfg, base={"nnUNet_n_proc_DA": "12"})
    assert env["nnUNet_n_proc_DA"] == "12" and "nnUNet_def_n_proc" not in env  # GPU machines keep their pools


def test_gpu_preset_without_cuda_says_what_to_do():
    with pytest.raises(config.DemoError, match="no CUDA GPU.*--preset cpu"):
        resolve(["--preset", "gpu"], cuda=False)
    assert resolve(["--preset", "gpu", "--device", "cpu"]).device == "cpu"  # an explicit device is obeyed


def test_flags_override_the_preset():
    cfg = resolve(["--preset", "cpu", "--out", "o", "--cases", "7", "--unlabeled", "0", "--pretrain-epochs", "3",
                   "--pretrain-iters", "4", "--seed", "9", "--finetune-trainers", "A", "B"], cuda=True)
    assert (cfg.preset, cfg.device, cfg.cases, cfg.unlabeled, cfg.pretrain_epochs, cfg.pretrain_iters, cfg.seed,
            cfg.pgl_trainer, cfg.scratch_trainer) == ("cpu", "cpu", 7, 0, 3, 4, 9, "A", "B")
    pretrain = stages.stage_commands(cfg, bin_dir="/b")["pretrain"]
    assert "--unlabeled" not in pretrain  # nothing to ingest
    assert flag_value(pretrain, "--seed") == "9" and flag_value(pretrain, "--exclude-fold") == "0"


@pytest.mark.parametrize("argv, match", [(["--cases", "4"], "at least 5"), (["--pretrain-epochs", "0"], ">= 1"),
                                         (["--pretrain-iters", "0"], ">= 1"), (["--unlabeled", "-1"], ">= 0")])
def test_bad_sizes_are_refused(argv, match):
    with pytest.raises(config.DemoError, match=match):
        resolve(argv)


def test_help_describes_both_presets():
    text = cli.build_parser().format_help()
    for preset in config.PRESETS.values():
        assert preset.trainers[0] in text and preset.trainers[1] in text and preset.expected in text
    assert "cpu:" in text and "gpu:" in text and "-device cuda" in text


def test_demo_trainers_are_twins():
    from nnunet_pgl.trainers import pgl
    for preset in config.PRESETS.values():
        a, b = (getattr(pgl, name) for name in preset.trainers)
        assert issubclass(a, pgl.nnUNetTrainerPGL) and not issubclass(b, pgl.nnUNetTrainerPGL)
        assert issubclass(b, pgl.nnUNetTrainerScratch)
        for attr in ("num_epochs_override", "iterations_override", "val_iterations_override"):
            assert getattr(a, attr) == getattr(b, attr), (preset, attr)


# ------------------------------------------------------------------------------------- environment and --out
def test_env_uses_the_demo_folders_only(tmp_path):
    cfg = resolve(["--out", str(tmp_path / "d")])
    user = {"nnUNet_raw": "/data/raw", "nnUNet_preprocessed": "/data/pre", "nnUNet_results": "/data/res",
            "nnUNet_pgl_weights": "/elsewhere.pth", "nnUNet_extTrainer": "/mine", "PATH": "/bin"}
    env = stages.demo_env(cfg, base=user)
    for d in config.NNUNET_DIRS:
        assert env[d] == str(tmp_path / "d" / d)
    assert "nnUNet_pgl_weights" not in env and env["PATH"] == "/bin"
    from nnunet_pgl.trainers.discovery import shim_folder
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/mine", shim_folder()]
    assert env["nnUNet_def_n_proc"] == "1" and env["nnUNet_n_proc_DA"] == "0"
    assert "nnUNet_n_proc_DA" not in stages.stage_env("plan_and_preprocess", env)  # planning: set_num_threads(n)
    assert stages.stage_env("pretrain", env) is env


def test_foreign_non_empty_out_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(config.DemoError, match="not empty and is not a pgl_demo folder.*new or empty folder"):
        stages.prepare_out(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is not empty" in err and "leave --out out" in err
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(config.DemoError, match="is a file"):
        stages.prepare_out(str(f))


def test_previous_demo_folder_is_reused(tmp_path):
    out = tmp_path / "d"
    assert stages.prepare_out(str(out)) == []  # new folder
    assert (out / config.MARKER).is_file() and (out / "logs").is_dir()
    (out / "nnUNet_results" / "x").mkdir(parents=True)
    (out / config.REPORT_MD).write_text("old")
    (out / "keep.txt").write_text("not ours")
    removed = stages.prepare_out(str(out))
    assert set(removed) == {"nnUNet_results", "logs", config.REPORT_MD}
    assert sorted(os.listdir(out)) == sorted([config.MARKER, "logs", "keep.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stages.prepare_out(str(empty)) == []


# ------------------------------------------------------------------------------------- report
def fake_summary(path: str, dice: Dict[str, float]) -> None:
    """An nnU-Net 2.8 ``summary.json`` (:func:`conftest.write_summary`) of one case with the given Dice."""
    metrics = lambda d: {"Dice": d, "FN": 1, "FP": 2, "IoU": d / (2 - d) if d == d else d, "TN": 3, "TP": 4,
                         "n_pred": 5, "n_ref": 6}  # noqa: E731
    write_summary(path, [{"metrics": {k: metrics(v) for k, v in dice.items()}, "prediction_file": "p",
                          "reference_file": "r"}])


def test_dice_table_from_summary_json(tmp_path):
    for trainer, vals in (("P", {"1": 0.9, "2": 0.5, "3": float("nan")}), ("S", {"1": 0.8, "2": 0.6, "3": 0.25})):
        fake_summary(report.summary_path(str(tmp_path), trainer), vals)
    pgl = report.read_dice(str(tmp_path / config.DATASET / "P__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
                             / "summary.json"))
    scratch = report.read_dice(report.summary_path(str(tmp_path), "S"))
    assert pgl["1"] == 0.9 and math.isnan(pgl["3"]) and pgl["foreground_mean"] == pytest.approx(0.7)
    assert scratch["foreground_mean"] == pytest.approx(0.55)
    table = report.dice_table(pgl, scratch, LABELS).splitlines()
    assert table[:2] == ["| class | PGL | Scratch | PGL − Scratch |", "|---|---|---|---|"]
    assert table[2:] == ["| 1 liver | 0.9000 | 0.8000 | +0.1000 |",
                         "| 2 kidney | 0.5000 | 0.6000 | -0.1000 |",
                         "| 3 spleen | n/a | 0.2500 | n/a |",
                         "| foreground mean | 0.7000 | 0.5500 | +0.1500 |"]


def test_time_table_and_report():
    times = {"dataset": 0.5, "plan_and_preprocess": 20.25, "pretrain": 200.0, "finetune_pgl": 61.0,
             "finetune_scratch": 59.0, "total": 340.75}
    cpu = {"dataset": 0.5, "plan_and_preprocess": 30.0, "pretrain": 380.0, "finetune_pgl": 100.0,
           "finetune_scratch": 95.5}
    table = report.time_table(times, cpu).splitlines()
    assert table[0] == "| stage | wall time | wall s | CPU s |"
    assert table[2:] == ["| dataset generation | 0.5 s | 0.5 | 0 |", "| plan & preprocess | 20.2 s | 20.2 | 30 |",
                         "| pretrain | 3 min 20.0 s | 200.0 | 380 |", "| fine-tune PGL | 1 min 01.0 s | 61.0 | 100 |",
                         "| fine-tune scratch | 59.0 s | 59.0 | 96 |", "| total | 5 min 40.8 s | 340.8 | 606 |"]
    assert report.time_table({"pretrain": 1.0, "total": 1.0}).splitlines()[2:] == [
        "| pretrain | 1.0 s | 1.0 | n/a |", "| total | 1.0 s | 1.0 | n/a |"]
    cfg = resolve(["--out", "/o"])
    dice = {"pgl": {"1": 0.5, "foreground_mean": 0.5}, "scratch": {"1": 0.4, "foreground_mean": 0.4}}
    md = report.render_report(cfg, dice, times, cpu, LABELS, stages.stage_commands(cfg, bin_dir="/b"), "abc123")
    assert "| 1 liver | 0.5000 | 0.4000 | +0.1000 |" in md and "| total | 5 min 40.8 s | 340.8 | 606 |" in md
    assert "pgl_pretrain -d 990 -c 3d_fullres -device cpu" in md and "revision abc123" in md
    assert "nnUNetv2_train 990 3d_fullres 0 -tr nnUNetTrainerScratch_demo -device cpu" in md


# ------------------------------------------------------------------------------------- main with stand-in commands
def stand_in_commands(fail_stage: str = "") -> object:
    """``stage_commands`` replacement: quick Python one-liners; fine-tuning writes a summary.json as nnU-Net would."""
    def commands(cfg: config.DemoConfig, bin_dir=None) -> Dict[str, List[str]]:
        results = os.path.join(cfg.out, "nnUNet_results")
        out = {}
        for stage in config.STAGES[1:]:
            code = "print('nnU-Net spam ' * 50)"
            if stage.startswith("finetune"):
                trainer = cfg.pgl_trainer if stage == "finetune_pgl" else cfg.scratch_trainer
                path = report.summary_path(results, trainer)
                fake_summary(path + ".template", {"1": 0.8, "2": 0.6, "3": 0.4 if stage == "finetune_pgl" else 0.5})
                code += f"; import os; os.replace({path + '.template'!r}, {path!r})"  # appears when the stage runs
            if stage == fail_stage:
                code += "; import sys; print('boom: the real error', file=sys.stderr); sys.exit(3)"
            out[stage] = [sys.executable, "-c", code]
        return out
    return commands


def test_main_writes_reports_and_one_line_per_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "stage_commands", stand_in_commands())
    monkeypatch.setenv("nnUNet_results", "/somewhere/else")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    out = tmp_path / "run"
    cli.main(["--out", str(out), "--preset", "cpu", "--cases", "5", "--unlabeled", "2"])
    text = capsys.readouterr().out
    assert "nnU-Net spam" not in text and "$nnUNet_results is ignored" in text and "preset cpu" in text
    assert [line[:5] for line in text.splitlines() if line.startswith("[")] == [f"[{i}/5]" for i in range(1, 6)]
    assert "| 3 spleen | 0.4000 | 0.5000 | -0.1000 |" in text and "| total |" in text
    js = json.loads((out / config.REPORT_JSON).read_text())
    assert js["dice"]["pgl"]["foreground_mean"] == pytest.approx(0.6)
    assert js["dice"]["scratch"]["2"] == 0.6
    assert set(js["times_s"]) == set(config.STAGES) | {"total"} and set(js["cpu_s"]) == set(config.STAGES)
    assert js["config"]["cases"] == 5 and js["labels"] == LABELS
    md = (out / config.REPORT_MD).read_text()
    assert "| foreground mean | 0.6000 | 0.6333 | -0.0333 |" in md and "## Time per stage" in md
    for stage in config.STAGES:
        assert (out / "logs" / f"{stage}.log").is_file()
    assert "nnU-Net spam" in (out / "logs" / "pretrain.log").read_text()
    assert len(os.listdir(out / "nnUNet_raw" / config.DATASET / "imagesTr")) == 5
    assert sorted(os.listdir(out / "unlabeled")) == ["unl_000.nii.gz", "unl_001.nrrd"]
    cli.main(["--out", str(out), "--preset", "cpu", "--cases", "5", "--unlabeled", "0"])  # reuses the folder
    assert "previous demo outputs replaced" in capsys.readouterr().out


def test_failed_stage_shows_log_tail_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "stage_commands", stand_in_commands(fail_stage="pretrain"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(out), "--preset", "cpu", "--cases", "5", "--unlabeled", "0"])
    assert e.value.code == 1
    cap = capsys.readouterr()
    log = str(out / "logs" / "pretrain.log")
    assert "FAILED" in cap.out and "boom: the real error" in cap.err and f"Full log: {log}" in cap.err
    assert "stage 'pretrain' failed (exit status 3)" in cap.err
    assert not (out / "logs" / "finetune_pgl.log").exists() and not (out / config.REPORT_MD).exists()


def test_interrupt_names_the_stage(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "stage_commands", stand_in_commands())
    monkeypatch.setattr(cli, "run_stage", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "run"), "--preset", "cpu", "--cases", "5", "--unlabeled", "0"])
    assert e.value.code == 130
    assert "interrupted during stage 'plan_and_preprocess'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the real thing, tiny
@pytest.mark.slow
def test_pgl_demo_end_to_end(tmp_path):
    """Stock nnU-Net commands with tiny schedules (~3 min on 2 cores); the user's nnU-Net folders stay untouched."""
    user = tmp_path / "users_nnunet"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=str(user), nnUNet_preprocessed=str(user), nnUNet_results=str(user))
    out = tmp_path / "demo"
    cmd = [f"{BIN}/pgl_demo", "--out", str(out), "--cases", "5", "--unlabeled", "2", "--pretrain-epochs", "1",
           "--pretrain-iters", "2", "--finetune-trainers", "nnUNetTrainerPGL_smoke", "nnUNetTrainerScratch_smoke"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert os.listdir(user) == []
    assert "Please cite" not in p.stdout  # nnU-Net's output goes to the logs
    js = json.loads((out / config.REPORT_JSON).read_text())
    for arm in ("pgl", "scratch"):
        d = js["dice"][arm]
        assert set(d) == {"1", "2", "3", "foreground_mean"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in d.values()), d
    md = (out / config.REPORT_MD).read_text()
    for line in ("| 1 liver |", "| 2 kidney |", "| 3 spleen |", "| foreground mean |"):
        row = next(r for r in md.splitlines() if r.startswith(line))
        pgl, scratch = (float(c) for c in row.split("|")[2:4])
        assert 0.0 <= pgl <= 1.0 and 0.0 <= scratch <= 1.0
    assert "| total |" in md and "| 1 liver |" in p.stdout
    assert "PGL initialisation from" in (out / "logs" / "finetune_pgl.log").read_text()  # the PGL arm was initialised
    assert "chosen: fold_0, the pretraining for fold 0" in (out / "logs" / "finetune_pgl.log").read_text()
    assert "PGL initialisation" not in (out / "logs" / "finetune_scratch.log").read_text()
    assert (out / "nnUNet_results" / config.DATASET / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_0"
            / "checkpoint_final.pth").is_file()
    # the probe of the pretraining, random init against PGL, is printed and reported
    assert js["probe"]["pgl"]["all"] is not None and js["probe"]["random_init"]["all"] is not None
    assert "probe (mean foreground F1, all levels) PGL" in p.stdout and "| all levels |" in p.stdout
    assert "## Dense linear probe" in md and "- **Probe, random init**: how far the untrained network" in md


# ------------------------------------------------------------------------------------- probe and seeding
def test_demo_seeds_finetuning_and_reports_the_probe(tmp_path):
    """The fine-tuning subprocesses get nnUNet_pgl_seed = --seed; the report takes the probe of the pretraining's
    pgl_log.json (random init and the last probed epoch) and says what each number shows."""
    cfg = resolve(["--out", str(tmp_path / "d"), "--seed", "5"])
    assert stages.demo_env(cfg, base={})["nnUNet_pgl_seed"] == "5"
    results = tmp_path / "d" / "nnUNet_results"
    assert report.read_probe(str(results)) is None
    folder = results / config.DATASET / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_0"
    folder.mkdir(parents=True)
    init = {"levels": {"2": 0.5, "3": 0.25}, "all": 0.5, "cases": {"fit": ["a", "b"], "score": ["c"]}}
    last = {"levels": {"2": 0.75, "3": None}, "all": 0.625, "cases": init["cases"]}
    log = [{"epoch": 0, "probe_random_init": init}, {"epoch": 1, "probe": last}, {"epoch": 2}]
    (folder / "pgl_log.json").write_text(json.dumps(log))
    probe = report.read_probe(str(results))
    assert probe is not None and probe["random_init"] == init and probe["pgl"] == last and probe["epoch"] == 1
    assert report.probe_table(probe).splitlines() == [
        "| features | random init | PGL | PGL − random init |", "|---|---|---|---|",
        "| level 2 | 0.5000 | 0.7500 | +0.2500 |", "| level 3 | 0.2500 | n/a | n/a |",
        "| all levels | 0.5000 | 0.6250 | +0.1250 |"]
    dice = {"pgl": {"1": 0.5, "foreground_mean": 0.5}, "scratch": {"1": 0.4, "foreground_mean": 0.4}}
    md = report.render_report(cfg, dice, {"total": 1.0}, {}, LABELS, stages.stage_commands(cfg, bin_dir="/b"), "r",
                            probe)
    assert "| all levels | 0.5000 | 0.6250 | +0.1250 |" in md
    assert "fitted on the frozen features of 2 training cases and scored on 1 others" in md
    for name in ("Probe, random init", "Probe, PGL", "Probe, PGL − random init", "Dice, PGL", "Dice, Scratch",
                 "Dice, PGL − Scratch"):
        assert sum(line.startswith(f"- **{name}**: ") for line in md.splitlines()) == 1, name
    assert "(--seed 5, nnUNet_pgl_seed)" in md
    no_probe = report.render_report(cfg, dice, {"total": 1.0}, {}, LABELS, stages.stage_commands(cfg, bin_dir="/b"), "r")
    assert "Not available: the pretraining log has no probe" in no_probe


def test_seed_from_env(monkeypatch):
    import numpy as np
    import torch

    from nnunet_pgl.trainers.pgl import SEED_ENV, seed_from_env
    monkeypatch.delenv(SEED_ENV, raising=False)
    assert seed_from_env() is None
    monkeypatch.setenv(SEED_ENV, "11")
    draws = []
    for _ in range(2):
        assert seed_from_env() == 11
        draws.append((np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    monkeypatch.setenv(SEED_ENV, "eleven")
    with pytest.raises(ValueError, match="nnUNet_pgl_seed='eleven' is not an integer"):
        seed_from_env()
