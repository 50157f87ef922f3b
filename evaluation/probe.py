"""The dense linear probe on an nnU-Net dataset: which cases, which crops, which voxels; features → scores.

Used by ``pgl_pretrain`` (at the start, every ``--save-every`` epochs and at the end) and by ``pgl_probe``. The same
arguments give the same cases, crops and voxels, so scores of different networks (epochs, checkpoints, random
init) are measured on identical samples.

* **Cases**: the dataset's labeled training cases, minus the validation cases of fold ``K`` with
  ``exclude_fold=K`` (``splits_final.json``; nnU-Net's own 5-fold split, computed in memory, where the file does not
  exist yet), in an order permuted by ``seed``; the first ``n_cases`` of them, the first half to fit the probe on,
  the rest to score it on.
* **Crops**: one patch-sized crop per case (the network's input size; bounded cost whatever the case size),
  centred on a foreground voxel drawn from nnU-Net's ``class_locations`` (inside the case where it is larger than
  the patch; a smaller case is centred and padded: image 0, label "outside").
* **Voxels**: at most ``samples_per_class`` per class and crop (:func:`nnunet_pgl.probe.sample_voxels`); labels
  ``-1`` (outside the nonzero mask) and the ignore label are never used.
* **Score**: per level, and for all levels concatenated, a multinomial logistic regression fitted on the fit
  crops' samples and its per-class F1 (= Dice, estimated from the weighted samples) on the score crops; the
  summary is the mean over the foreground classes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from torch import nn

from nnunet_pgl.features import extract_features, unwrap_network
from nnunet_pgl.geometry import LevelGeometry, level_geometry
from nnunet_pgl.probe import f1_scores, features_at, fit_linear_probe, foreground_mean, sample_voxels
from nnunet_pgl.pretraining.loader import read_region

#: defaults of pgl_pretrain and pgl_probe (cost measured in BENCHMARKS.md, "Probe cost")
DEFAULT_CASES = 8
DEFAULT_SAMPLES_PER_CLASS = 256
DEFAULT_SEED = 12345


class ProbeUnavailable(RuntimeError):
    """The dataset cannot be probed (too few labeled cases); the message says why and what to do."""


@dataclass
class ProbeCrop:
    """One crop of a case: the network input and the sampled voxels with their classes and weights.

    Attributes:
        case_id: nnU-Net case identifier.
        image: ``(C, *patch)`` float32 CPU tensor (preprocessed intensities, 0 where the crop leaves the case).
        points: ``(P, 3)`` int64 voxel coordinates (z, y, x) in the crop; classes: ``(P,)`` class indices;
        weights: ``(P,)`` float32 (see :func:`nnunet_pgl.probe.sample_voxels`).
    """

    case_id: str
    image: torch.Tensor
    points: torch.Tensor
    classes: torch.Tensor
    weights: torch.Tensor


@dataclass
class ProbeSet:
    """The crops to fit and to score the probe on. ``labels[k]`` is the label value of class index ``k``."""

    fit: List[ProbeCrop]
    score: List[ProbeCrop]
    labels: List[int]
    patch_size: Tuple[int, ...]

    @property
    def case_ids(self) -> Dict[str, List[str]]:
        return {"fit": [c.case_id for c in self.fit], "score": [c.case_id for c in self.score]}


def validation_cases(preprocessed_dataset_folder_base: str, identifiers: Sequence[str], fold: int) -> List[str]:
    """Fold ``fold``'s validation cases of ``splits_final.json`` (nnU-Net's default split if the file is missing).

    Raises:
        ValueError: the fold does not exist.
    """
    splits_file = join(preprocessed_dataset_folder_base, "splits_final.json")
    if isfile(splits_file):
        splits = load_json(splits_file)
    else:  # what nnU-Net writes on its first training run; computed here without writing into the user's folder
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        splits = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)
    if not 0 <= fold < len(splits):
        raise ValueError(f"--exclude-fold {fold}: {splits_file} has folds 0-{len(splits) - 1}")
    return list(splits[fold]["val"])


def select_cases(identifiers: Sequence[str], n_cases: int, exclude: Sequence[str] = (), seed: int = DEFAULT_SEED,
                 ) -> Tuple[List[str], List[str]]:
    """``(fit, score)`` case ids: ``identifiers`` minus ``exclude``, sorted, permuted by ``seed``, first ``n_cases``.

    Raises:
        ProbeUnavailable: fewer than 2 cases are left (the probe needs one to fit and one to score).
        ValueError: ``n_cases`` < 2.
    """
    if n_cases < 2:
        raise ValueError(f"the probe needs at least 2 cases (one to fit, one to score); got {n_cases}")
    ex = set(exclude)
    ids = sorted(i for i in identifiers if i not in ex)
    if len(ids) < 2:
        raise ProbeUnavailable(f"the probe needs at least 2 labeled training cases and {len(ids)} are available"
                               + (f" after leaving out the {len(ex)} held-out validation cases" if ex else ""))
    order = np.random.RandomState(seed).permutation(len(ids))
    chosen = [ids[i] for i in order[:min(n_cases, len(ids))]]
    half = math.ceil(len(chosen) / 2)
    return chosen[:half], chosen[half:]


def _crop_start(shape: Sequence[int], patch: Sequence[int], centre: Optional[Sequence[int]]) -> List[int]:
    """First voxel of a patch-sized crop around ``centre``, kept inside the case where the case is large enough."""
    start = []
    for i, (n, p) in enumerate(zip(shape, patch)):
        if n <= p:
            start.append(-((p - n) // 2))
        else:
            c = n // 2 if centre is None else int(centre[i])
            start.append(min(max(c - p // 2, 0), n - p))
    return start


def _foreground_centre(properties: Dict[str, Any], rng: np.random.Generator) -> Optional[List[int]]:
    """A voxel (z, y, x) of a randomly chosen foreground class from nnU-Net's ``class_locations``; None if none."""
    locs = {k: np.asarray(v) for k, v in (properties.get("class_locations") or {}).items()
            if v is not None and len(v) > 0}
    if not locs:
        return None
    keys = sorted(locs, key=str)
    pts = locs[keys[int(rng.integers(len(keys)))]]
    return [int(x) for x in pts[int(rng.integers(len(pts)))][-3:]]


def load_crop(dataset: Any, case_id: str, patch_size: Sequence[int], label_to_class: Dict[int, int],
              samples_per_class: int, seed: int) -> ProbeCrop:
    """Read one case's crop from an nnU-Net dataset object (``load_case``) and sample its voxels.

    Args:
        dataset: an instance of nnU-Net's dataset class for the preprocessed folder (e.g. ``nnUNetDatasetBlosc2``).
        label_to_class: label value → class index; other values (-1, the ignore label) are not sampled.
    """
    data, seg, _, props = dataset.load_case(case_id)
    rng = np.random.default_rng([seed, *[ord(ch) for ch in case_id]])
    start = _crop_start(seg.shape[1:], patch_size, _foreground_centre(props, rng))
    image = read_region(data, start, patch_size)
    seg_crop = read_region(seg, start, patch_size)[0]
    inside = np.zeros(seg_crop.shape, dtype=bool)
    sl = tuple(slice(max(0, -s), min(p, n - s)) for s, p, n in zip(start, patch_size, seg.shape[1:]))
    inside[sl] = True
    lut = np.full(int(max(label_to_class) + 2) if label_to_class else 1, -1, dtype=np.int64)
    for v, k in label_to_class.items():
        lut[v] = k
    vals = np.rint(seg_crop).astype(np.int64)
    classes = np.where(inside & (vals >= 0) & (vals < len(lut)), lut[np.clip(vals, 0, len(lut) - 1)], -1)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    points, cls, wts = sample_voxels(torch.from_numpy(classes), samples_per_class, gen)
    return ProbeCrop(case_id, torch.from_numpy(np.ascontiguousarray(image)), points, cls, wts)


def build_probe_set(preprocessed_dataset_folder_base: str, data_folder: str, patch_size: Sequence[int],
                    label_manager: Any, n_cases: int = DEFAULT_CASES, exclude_fold: Optional[int] = None,
                    samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS, seed: int = DEFAULT_SEED) -> ProbeSet:
    """Select the cases, read their crops and sample their voxels (see the module docstring).

    Args:
        preprocessed_dataset_folder_base: ``$nnUNet_preprocessed/<Dataset>`` (holds ``splits_final.json``).
        data_folder: the configuration's preprocessed data folder (``<base>/<data_identifier>``).
        patch_size: the network input size.
        label_manager: nnU-Net's ``LabelManager`` of the dataset (its ``all_labels`` and ``ignore_label``).

    Raises:
        ProbeUnavailable: fewer than 2 labeled cases (after the exclusion).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset_class = infer_dataset_class(data_folder)
    ids = sorted(dataset_class.get_identifiers(data_folder))
    exclude = validation_cases(preprocessed_dataset_folder_base, ids, exclude_fold) if exclude_fold is not None else []
    fit_ids, score_ids = select_cases(ids, n_cases, exclude, seed)
    dataset = dataset_class(data_folder, fit_ids + score_ids)
    labels = [int(v) for v in label_manager.all_labels]
    label_to_class = {v: k for k, v in enumerate(labels)}
    patch = tuple(int(p) for p in patch_size)

    def crops(case_ids: List[str]) -> List[ProbeCrop]:
        return [load_crop(dataset, i, patch, label_to_class, samples_per_class, seed) for i in case_ids]

    return ProbeSet(crops(fit_ids), crops(score_ids), labels, patch)


def _crop_features(network: nn.Module, crop: ProbeCrop, levels: Sequence[int], device: torch.device,
                   origins: Sequence[Sequence[float]]) -> List[torch.Tensor]:
    """``(P, C_L)`` float32 features of ``crop``'s sampled voxels per level (forward pass without gradients)."""
    x = crop.image[None].to(device)
    amp = torch.autocast(device.type, enabled=device.type == "cuda")
    with torch.no_grad(), amp:
        feats = extract_features(network, x, levels)
    pts = crop.points.to(device)
    return [features_at(f[0].float(), crop.image.shape[1:], pts, o) for f, o in zip(feats, origins)]


def _scores_json(scores: torch.Tensor, labels: Sequence[int]) -> Dict[str, Optional[float]]:
    return {str(lab): (None if math.isnan(v) else float(v)) for lab, v in zip(labels, scores.tolist())}


def probe_network(network: nn.Module, levels: Sequence[int], probe_set: ProbeSet, device: torch.device,
                  geometry: Optional[Sequence[LevelGeometry]] = None, l2: float = 1e-3, max_iter: int = 100,
                  ) -> Dict[str, Any]:
    """Score the frozen features of ``network`` at ``levels`` with linear probes (one per level, one for all).

    The network is put in eval mode for the forward passes and returned to its previous mode; its weights are not
    touched. Features are read at the sampled voxels where the network's feature voxels sit (``geometry``, per
    level 0 … n − 1; default: measured with :func:`nnunet_pgl.level_geometry`, as the pretraining aligns them).

    Returns:
        ``{'levels': {'<L>': fg mean, ...}, 'all': fg mean, 'per_class': {'<L>' | 'all': {'<label>': F1}},
        'cases': {'fit': [...], 'score': [...]}, 'time_s': seconds}``; a score is None where no foreground class
        occurs in the score crops' samples or the probe's predictions.
    """
    t0 = time.perf_counter()
    net = unwrap_network(network)
    levels = sorted(int(lv) for lv in levels)
    geom = list(geometry) if geometry is not None else level_geometry(net)
    origins = [geom[lv].origin for lv in levels]
    was_training = net.training
    net.eval()
    try:
        fit = [_crop_features(net, c, levels, device, origins) for c in probe_set.fit]
        score = [_crop_features(net, c, levels, device, origins) for c in probe_set.score]
    finally:
        net.train(was_training)

    def stack(crops: List[ProbeCrop]) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([c.classes for c in crops]).to(device), torch.cat([c.weights for c in crops]).to(device))

    y_fit, w_fit = stack(probe_set.fit)
    y_score, w_score = stack(probe_set.score)
    k = len(probe_set.labels)
    names = [str(lv) for lv in levels] + ["all"]
    out: Dict[str, Any] = {"levels": {}, "all": None, "per_class": {}}
    for j, name in enumerate(names):
        if name == "all":
            x_fit = torch.cat([torch.cat(f, dim=1) for f in fit])
            x_score = torch.cat([torch.cat(f, dim=1) for f in score])
        else:
            x_fit = torch.cat([f[j] for f in fit])
            x_score = torch.cat([f[j] for f in score])
        probe = fit_linear_probe(x_fit, y_fit, k, w_fit, l2=l2, max_iter=max_iter)
        f1 = f1_scores(probe.predict(x_score), y_score, k, w_score)
        fg = foreground_mean(f1)
        value = None if math.isnan(fg) else fg
        if name == "all":
            out["all"] = value
        else:
            out["levels"][name] = value
        out["per_class"][name] = _scores_json(f1, probe_set.labels)
    out["cases"] = probe_set.case_ids
    out["time_s"] = time.perf_counter() - t0
    return out


def format_scores(result: Dict[str, Any]) -> str:
    """``level 2: 0.412, level 3: 0.388, all: 0.455`` (mean foreground F1)."""
    def f(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.3f}"
    return ", ".join([f"level {k}: {f(v)}" for k, v in result["levels"].items()] + [f"all: {f(result['all'])}"])
