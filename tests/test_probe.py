"""The dense linear probe: voxel sampling, feature reading, the logistic-regression probe and its F1 scores
(``nnunet_pgl.probe``), case selection and crops on an nnU-Net dataset (``nnunet_pgl.evaluation.probe``), and the
probe of a real network built by nnU-Net from plans."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_pgl.evaluation.probe import (ProbeCrop, ProbeSet, ProbeUnavailable, load_crop, probe_network,
                                         select_cases)
from nnunet_pgl.probe import f1_scores, features_at, fit_linear_probe, foreground_mean, sample_voxels


pytestmark = pytest.mark.usefixtures("one_thread")


def _labels(shape=(6, 10, 12), seed=0) -> torch.Tensor:
    """Background 0 with a box of class 1, a box of class 2 and a rim of -1 (outside the image)."""
    lab = torch.zeros(shape, dtype=torch.long)
    lab[1:4, 2:6, 3:9] = 1
    lab[2:5, 6:9, 1:4] = 2
    lab[:, :, -1] = -1
    return lab


# ------------------------------------------------------------------------------------------------ sampling
def test_sample_voxels_is_stratified_and_weighted():
    lab = _labels()
    counts = {c: int((lab == c).sum()) for c in (0, 1, 2)}
    pts, cls, w = sample_voxels(lab, 20, torch.Generator().manual_seed(1))
    for c in (0, 1, 2):
        sel = cls == c
        assert int(sel.sum()) == min(20, counts[c])
        assert float(w[sel].sum()) == pytest.approx(counts[c])       # weighted samples stand for every voxel
    assert torch.equal(lab[pts[:, 0], pts[:, 1], pts[:, 2]], cls)    # each point carries its own label
    assert not bool((pts[:, 2] == lab.shape[2] - 1).any())           # -1 (outside) is never sampled
    assert len({tuple(p) for p in pts.tolist()}) == pts.shape[0]      # without replacement
    # a class with fewer voxels than asked for is taken whole, with weight 1
    pts, cls, w = sample_voxels(lab, 10 ** 6)
    assert pts.shape[0] == sum(counts.values()) and torch.all(w == 1)
    again = sample_voxels(lab, 20, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], sample_voxels(lab, 20, torch.Generator().manual_seed(1))[0])


def test_features_at_follows_the_stride_convention(coords):
    field = coords((8, 12, 16))[0]                                   # (3, Z, Y, X): channel = own coordinate
    pts = torch.tensor([[0, 0, 0], [3, 7, 15], [7, 11, 2]])
    assert torch.equal(features_at(field, (8, 12, 16), pts), pts.float())     # stride 1: the voxels themselves
    # average-pooling a linear field by s puts feature voxel i at input coordinate i·s + (s − 1)/2, so reading the
    # pooled map back at input voxels inside the hull of those centres gives the field exactly
    pooled = F.avg_pool3d(field[None], (2, 4, 4))[0]                 # (3, 4, 3, 4)
    inner = torch.tensor([[0.5, 1.5, 1.5], [3, 7, 9], [6.5, 9.5, 13.5], [2, 2, 2]])
    assert torch.allclose(features_at(pooled, (8, 12, 16), inner), inner, atol=1e-5)
    # a strided subsampling (what a stride-s convolution with centred padding does) puts voxel i at i·s: origin 0
    sub = field[:, ::2, ::4, ::4]
    inner0 = torch.tensor([[0, 0, 0], [3, 7, 9], [6, 8, 12], [1.5, 2, 5]])
    assert torch.allclose(features_at(sub, (8, 12, 16), inner0, origin=(0, 0, 0)), inner0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        features_at(field[None], (8, 12, 16), pts)


# ------------------------------------------------------------------------------------------------ probe and F1
def test_f1_by_hand():
    pred = torch.tensor([0, 1, 1, 2, 0, 1])
    target = torch.tensor([0, 1, 2, 2, 1, 1])
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    f1 = f1_scores(pred, target, 4, w)
    # class 1: TP = 2 + 1, FP = 1 (the 2 predicted as 1), FN = 3 → 6 / 10; class 2: TP 1, FN 1 → 2/3
    # class 0: TP 1, FP 3 → 2/5; class 3: nowhere → NaN
    assert f1[:3].tolist() == pytest.approx([2 / 5, 6 / 10, 2 / 3])
    assert math.isnan(float(f1[3]))
    assert foreground_mean(f1) == pytest.approx((6 / 10 + 2 / 3) / 2)
    assert math.isnan(foreground_mean(torch.tensor([1.0, math.nan])))


def _crop_feats(kind: str, lab: torch.Tensor, pts: torch.Tensor, seed: int) -> torch.Tensor:
    c = lab[pts[:, 0], pts[:, 1], pts[:, 2]]
    if kind == "onehot":
        noise = torch.randn(len(c), 3, generator=torch.Generator().manual_seed(seed))
        return F.one_hot(c, 3).float() * 5 + 0.01 * noise
    if kind == "constant":
        return torch.ones(len(c), 4)
    return torch.randn(len(c), 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["onehot", "constant", "noise"])
def test_probe_separates_informative_features_from_noise(kind):
    """Features that are the one-hot label: every class perfectly (F1 = 1). Constant features (a collapsed
    network): the probe can only predict the weighted majority, background, so every foreground F1 is exactly 0.
    Label-independent noise: well below the one-hot probe."""
    g = torch.Generator().manual_seed(0)
    fit_lab, score_lab = _labels(), _labels().roll(1, dims=0)
    fp, fc, fw = sample_voxels(fit_lab, 40, g)
    sp, sc, sw = sample_voxels(score_lab, 40, g)
    probe = fit_linear_probe(_crop_feats(kind, fit_lab, fp, 1), fc, 3, fw)
    f1 = f1_scores(probe.predict(_crop_feats(kind, score_lab, sp, 2)), sc, 3, sw)
    if kind == "onehot":
        assert f1.tolist() == [1.0, 1.0, 1.0]
    elif kind == "constant":
        assert f1[1:].tolist() == [0.0, 0.0] and foreground_mean(f1) == 0.0
    else:
        assert foreground_mean(f1) < 0.5


def test_fit_is_float32_under_autocast_and_rejects_bad_shapes():
    x = torch.randn(50, 3)
    y = (x[:, 0] > 0).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = fit_linear_probe(x.bfloat16(), y, 2)
    assert probe.weight.dtype == torch.float32 and probe.logits(x).dtype == torch.float32
    assert float((probe.predict(x) == y).float().mean()) == 1.0      # linearly separable along feature 0
    with pytest.raises(ValueError, match="N >= 1"):
        fit_linear_probe(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2)


# ------------------------------------------------------------------------------------------------ nnU-Net glue
def test_select_cases_holds_out_and_is_reproducible():
    ids = [f"case_{i:03d}" for i in range(10)]
    held = ["case_001", "case_004"]
    fit, score = select_cases(ids, 5, held, seed=3)
    assert len(fit) == 3 and len(score) == 2
    assert not set(fit + score) & set(held) and not set(fit) & set(score)
    assert (fit, score) == select_cases(list(reversed(ids)), 5, held, seed=3)   # order of listing does not matter
    assert select_cases(ids, 100, held)[0] + select_cases(ids, 100, held)[1] != []
    assert sorted(sum(select_cases(ids, 100, held), [])) == sorted(set(ids) - set(held))
    with pytest.raises(ProbeUnavailable, match="at least 2 labeled training cases and 1 are available after"):
        select_cases(ids[:3], 4, ids[:2])
    with pytest.raises(ValueError, match="at least 2 cases"):
        select_cases(ids, 1)


class FakeDataset:
    """``load_case`` like nnU-Net's dataset classes, from in-memory arrays (C, Z, Y, X)."""

    def __init__(self, cases):
        self.cases = cases

    def load_case(self, case_id):
        data, seg, props = self.cases[case_id]
        return data, seg, None, props


def test_crop_around_foreground_inside_the_case_and_padding_is_never_sampled():
    shape = (10, 40, 40)
    seg = np.zeros((1, *shape), dtype=np.int8)
    seg[0, 4:7, 30:36, 30:36] = 2
    seg[0, :, :2, :] = -1                                            # outside the nonzero mask
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    props = {"class_locations": {2: np.array([[0, 5, 33, 33]]), 1: np.zeros((0, 4))}}
    big = FakeDataset({"a": (data, seg, props)})
    crop = load_crop(big, "a", (8, 16, 16), {0: 0, 1: 1, 2: 2}, 50, seed=0)
    # the crop is centred on the only foreground voxel (5, 33, 33) and kept inside the case: start (1, 24, 24)
    assert torch.equal(crop.image, torch.from_numpy(data[:, 1:9, 24:40, 24:40]))
    assert set(crop.classes.tolist()) == {0, 2}
    assert int((crop.classes == 2).sum()) == 50 and float(crop.weights[crop.classes == 2].sum()) == 3 * 6 * 6
    # a case smaller than the patch is centred and padded; padded voxels are "outside" and never sampled
    small = FakeDataset({"b": (data[:, :4, :6, :6], seg[:, :4, :6, :6] * 0 + 1, {"class_locations": {}})})
    crop = load_crop(small, "b", (8, 16, 16), {0: 0, 1: 1}, 10 ** 6, seed=0)
    assert crop.image.shape == (1, 8, 16, 16) and crop.points.shape[0] == 4 * 6 * 6
    lo = torch.tensor([2, 5, 5])
    assert bool(((crop.points >= lo) & (crop.points < lo + torch.tensor([4, 6, 6]))).all())
    assert float(crop.image[0, 0].abs().sum()) == 0.0                # image padding is 0


@pytest.fixture(scope="module")
def net():
    from test_features import build
    return build("plain")[0]


def _probe_set(informative: bool) -> ProbeSet:
    """Crops whose image *is* the label (times 100) or pure noise, patch 16×32×32. The score crops are mirrored
    in x, so that where a class sits in the fit crops tells nothing about the score crops."""
    g = torch.Generator().manual_seed(0)
    crops = []
    for i in range(4):
        lab = torch.zeros(16, 32, 32, dtype=torch.long)
        lab[3 + i:11, 5:20 + i, 8:22] = 1
        lab[4:12, 20 + i:28, 2:9 + i] = 2
        if i >= 2:
            lab = lab.flip(-1)
        img = lab.float()[None] * 100 if informative else torch.randn(1, 16, 32, 32, generator=g)
        pts, cls, w = sample_voxels(lab, 64, g)
        crops.append(ProbeCrop(f"c{i}", img, pts, cls, w))
    return ProbeSet(crops[:2], crops[2:], [0, 1, 2], (16, 32, 32))


def test_probe_network_on_an_nnunet_network(net):
    """A random U-Net's full-resolution features of images that show the labels score far above the same
    network's features of noise images; the network's weights and mode are untouched."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    good = probe_network(net, [0, 2], _probe_set(True), torch.device("cpu"))
    bad = probe_network(net, [0, 2], _probe_set(False), torch.device("cpu"))
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert set(good["levels"]) == {"0", "2"} and set(good["per_class"]) == {"0", "2", "all"}
    assert set(good["per_class"]["all"]) == {"0", "1", "2"} and good["time_s"] > 0
    assert good["levels"]["0"] > bad["levels"]["0"] + 0.5
    assert good["all"] == pytest.approx(np.mean([good["per_class"]["all"][c] for c in ("1", "2")]))


# ------------------------------------------------------------------------------------------------ pgl_probe pieces
def test_read_weights_and_load_into(net, tmp_path):
    """pgl_probe reads network_weights (prefixes of DDP / torch.compile stripped), loads every feature weight, lets
    the segmentation layers differ (an nnU-Net checkpoint of another label set), and names the first mismatch."""
    from nnunet_pgl.evaluation.probe_cli import load_into, read_weights

    with pytest.raises(ValueError, match="does not exist"):
        read_weights(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*complete checkpoint file"):
        read_weights(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'network_weights'"):
        read_weights(str(tmp_path / "other.pth"))

    sd = {k: v.clone() + 1.0 if v.is_floating_point() else v.clone() for k, v in net.state_dict().items()}
    sd = {k: torch.zeros(7, 2) if ".seg_layers." in k and k.endswith("weight") else v for k, v in sd.items()}
    torch.save({"network_weights": {"module._orig_mod." + k: v for k, v in sd.items()}}, tmp_path / "ok.pth")
    w = read_weights(str(tmp_path / "ok.pth"))
    assert set(w) == set(sd)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        load_into(net, w, "ok.pth", "nnUNetPlans", "3d_fullres")
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[k] if ".seg_layers." in k else sd[k]), k
        bad = dict(w)
        key = next(k for k in bad if k.startswith("encoder.") and k.endswith("weight"))
        bad[key] = torch.zeros(3)
        with pytest.raises(ValueError, match=f"'{key}' has shape \\(3,\\).*give the -p/-c it was trained with"):
            load_into(net, bad, "bad.pth", "nnUNetPlans", "3d_fullres")
        fewer = {k: v for k, v in w.items() if k != key}
        with pytest.raises(ValueError, match="1 weights missing"):
            load_into(net, fewer, "few.pth", "nnUNetPlans", "3d_fullres")
    finally:
        net.load_state_dict(saved)


def test_results_table_one_row_per_checkpoint():
    from nnunet_pgl.evaluation.probe_cli import results_table

    res = {"random": {"levels": {"2": 0.25, "3": None}, "all": 0.5},
           "a/checkpoint_final.pth": {"levels": {"2": 0.75, "3": 0.125}, "all": 0.875}}
    assert results_table(res).splitlines() == [
        "| checkpoint | level 2 | level 3 | all levels |", "|---|---|---|---|",
        "| random | 0.2500 | n/a | 0.5000 |", "| a/checkpoint_final.pth | 0.7500 | 0.1250 | 0.8750 |"]


# ------------------------------------------------------------------------------------------------ pretrainer hooks
class _FakePretrainer:
    """The attributes the probe hooks of nnUNetPretrainerPGL read, with the log captured."""

    def __init__(self, **cfg):
        from types import SimpleNamespace

        from nnunet_pgl.pretraining.config import PretrainConfig
        self.pgl_config = PretrainConfig(**cfg)
        self.local_rank, self.current_epoch, self.num_epochs, self.save_every = 0, 0, 3, 2
        self.configuration_name = "3d_fullres"
        self.plans_manager = SimpleNamespace(plans_name="nnUNetPlans")
        self.pgl_log, self.lines, self._collapse, self._probe_set, self._probe_init = [], [], None, None, None

    def print_to_log_file(self, *args):
        self.lines.append(" ".join(str(a) for a in args))


def test_probe_off_is_said_in_plain_words():
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL

    t = _FakePretrainer(use_labeled_images=False)
    nnUNetPretrainerPGL._probe_start(t)
    assert t._probe_set is None and len(t.lines) == 1
    assert t.lines[0].startswith("Probe: off. The dense linear probe is fitted and scored on the dataset's labeled")
    assert "--no-labeled-images" in t.lines[0] and "pgl_probe -d DATASET -c 3d_fullres -p nnUNetPlans" in t.lines[0]
    t = _FakePretrainer(probe=False)
    nnUNetPretrainerPGL._probe_start(t)
    assert t.lines == ["Probe: off (--no-probe)"]


def test_epoch_end_adds_probe_when_due_and_warns_on_collapse():
    """The random-init score goes into the first record only; the probe runs every save_every epochs and at the
    last epoch; collapse statistics are logged each epoch and a collapsed epoch is warned about."""
    from nnunet_pgl.collapse import LevelStats
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL

    class Monitor:
        def __init__(self, stats):
            self.stats, self.steps = stats, 1

        def summary(self):
            return self.stats

        def reset(self):
            pass

    t = _FakePretrainer()
    t._probe_set, t._probe_init = object(), {"levels": {"2": 0.1}, "all": 0.1}
    t._run_probe = lambda when: {"levels": {"2": 0.3}, "all": 0.3, "time_s": 1.0, "when": when}
    healthy = [LevelStats(2, 0.6, 20.0, 0.1, 0.0)]
    for epoch, stats in enumerate([healthy, healthy, [LevelStats(2, 0.01, 1.0, 0.1, 0.0)]]):
        t.current_epoch, t._collapse = epoch, Monitor(stats)
        rec = {"epoch": epoch, "epoch_time_s": 100.0}
        t.pgl_log.append(rec)
        nnUNetPretrainerPGL._probe_and_collapse(t, rec)
    assert [("probe_random_init" in r, r.get("probe", {}).get("when")) for r in t.pgl_log] == [
        (True, None), (False, "epoch 1"), (False, "epoch 2")]       # save_every 2: epoch 1; the last epoch: 2
    assert all(r["collapse"][0]["level"] == 2 for r in t.pgl_log)
    warnings = [line for line in t.lines if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "level 2: the projections have collapsed" in warnings[0]
    assert sum(line.startswith("Collapse/shortcut: level 2: spread") for line in t.lines) == 3
    assert "Probe time: 1.0 % of this epoch's training time" in t.lines


def test_a_failing_probe_never_stops_the_run():
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL

    t = _FakePretrainer()
    t._probe_set, t.network, t.device, t.probe_levels = object(), None, torch.device("cpu"), [2]
    t.online = type("Online", (), {"geometry": None})()
    assert nnUNetPretrainerPGL._run_probe(t, "epoch 4") is None     # a probe set that is not one: it fails
    assert len(t.lines) == 1 and t.lines[0].startswith("WARNING: the probe (epoch 4) failed and was skipped, training")
    rec = {"epoch": 1, "epoch_time_s": 10.0}
    t.current_epoch, t._run_probe = 1, lambda when: None
    nnUNetPretrainerPGL._probe_and_collapse(t, rec)
    assert "probe" not in rec
