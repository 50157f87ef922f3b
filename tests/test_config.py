"""``PretrainConfig``: its JSON form, saving and loading (atomic, no data lost on a failed write), and how a trainer
process finds it through ``$nnUNet_pgl_config``."""
from __future__ import annotations

import json
import os
from dataclasses import fields

import pytest

from nnunet_pgl.pretraining.config import CONFIG_ENV, PretrainConfig, config_from_env

ENV = "nnUNet_pgl_config"       # the variable's documented name, spelled out rather than taken from the module

#: a value different from the default for every field
NON_DEFAULT = dict(
    method="pgl+byol", levels=[1, 3], epochs=7, iters_per_epoch=11, batch_size=6, initial_lr=0.25,
    weight_decay=1e-4, momentum=0.9, warmup_epochs=1, grad_clip=3.5, base_tau=0.95, proj_dim=32, hidden_dim=64,
    global_weight=0.5, scale_range=[1.0, 1.25], min_overlap=0.3, flip_prob=0.0, intensity_aug=False, save_every=2,
    num_workers=3, seed=7, max_bad_steps=9, use_labeled_images=False, exclude_fold=2, probe=False, probe_cases=4,
    probe_samples=64, collapse_every=0, unlabeled_dirs=["/data/a", "/data/b"],
    unlabeled_cases=[{"case_id": "u_0001", "data_file": "/cache/u_0001.b2nd", "sha256": "ab" * 32,
                      "source": "/data/a/u_0001.nii.gz"}],
    schedule_extension={"start_step": 40, "start_epoch": 4, "from_epochs": 4, "from_iters_per_epoch": 10,
                        "lr": 0.01, "tau": 0.99, "ramp_steps": 20},
)


def test_the_variable_is_the_documented_one():
    assert CONFIG_ENV == ENV


def test_every_field_is_set_away_from_its_default():
    default = PretrainConfig()
    assert set(NON_DEFAULT) == {f.name for f in fields(PretrainConfig)}
    for name, value in NON_DEFAULT.items():
        assert getattr(default, name) != value, name


def test_json_round_trip_keeps_every_field():
    cfg = PretrainConfig(**NON_DEFAULT)
    d = json.loads(json.dumps(cfg.to_json()))                        # through real JSON text
    assert d == NON_DEFAULT
    back = PretrainConfig.from_json(d)
    assert back == cfg
    for name, value in NON_DEFAULT.items():
        assert getattr(back, name) == value, name
    assert PretrainConfig.from_json(PretrainConfig().to_json()) == PretrainConfig()


def test_from_json_names_unknown_keys():
    d = dict(PretrainConfig().to_json(), epochz=3, lr_warmup=1)
    with pytest.raises(ValueError) as e:
        PretrainConfig.from_json(d)
    msg = str(e.value)
    assert "epochz" in msg and "lr_warmup" in msg
    assert "epochs" in msg                                           # the known keys, to spot the typo


def test_from_json_of_a_partial_dict_fills_defaults():
    cfg = PretrainConfig.from_json({"epochs": 3, "unlabeled_dirs": ["/u"]})
    assert cfg == PretrainConfig(epochs=3, unlabeled_dirs=["/u"])


def test_save_then_load_is_equal_and_leaves_only_the_file(tmp_path):
    cfg = PretrainConfig(**NON_DEFAULT)
    path = tmp_path / "pgl_config.json"
    cfg.save(str(path))
    assert os.listdir(tmp_path) == ["pgl_config.json"]              # no temporary file left behind
    assert json.loads(path.read_text()) == NON_DEFAULT
    assert PretrainConfig.load(str(path)) == cfg


def test_save_replaces_an_existing_file_by_rename(tmp_path):
    path = tmp_path / "pgl_config.json"
    PretrainConfig(epochs=1).save(str(path))
    inode = os.stat(path).st_ino
    PretrainConfig(epochs=2).save(str(path))
    assert PretrainConfig.load(str(path)).epochs == 2
    # a new file renamed over the old one (a reader sees the old or the new file whole), not the old one rewritten
    assert os.stat(path).st_ino != inode
    assert os.listdir(tmp_path) == ["pgl_config.json"]


def test_a_failed_save_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "pgl_config.json"
    PretrainConfig(epochs=1).save(str(path))
    old = path.read_text()

    def no_rename(src, dst):
        assert os.path.dirname(os.path.abspath(src)) == str(tmp_path)  # the temporary sits beside the target
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        PretrainConfig(epochs=2).save(str(path))
    monkeypatch.undo()
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["pgl_config.json"]


def test_config_from_env_unset_or_empty_gives_the_defaults(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert config_from_env() == PretrainConfig()
    monkeypatch.setenv(ENV, "")
    assert config_from_env() == PretrainConfig()


def test_config_from_env_missing_file_says_what_to_do(tmp_path, monkeypatch):
    missing = tmp_path / "gone" / "pgl_config.json"
    monkeypatch.setenv(ENV, str(missing))
    with pytest.raises(FileNotFoundError) as e:
        config_from_env()
    msg = str(e.value)
    assert ENV in msg and str(missing) in msg
    assert "Unset the variable" in msg and "pgl_pretrain" in msg


def test_config_from_env_reads_the_saved_file(tmp_path, monkeypatch):
    cfg = PretrainConfig(**NON_DEFAULT)
    path = tmp_path / "pgl_config.json"
    cfg.save(str(path))
    monkeypatch.setenv(ENV, str(path))
    assert config_from_env() == cfg
    # each call reads the file anew (a fresh object: the trainer mutates its copy)
    first = config_from_env()
    first.epochs = 99
    assert config_from_env() == cfg
