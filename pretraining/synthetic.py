"""Synthetic abdominal-CT-like phantoms in nnU-Net's raw dataset layout (for tests and ``pgl_demo``).

Each case is a body (an elliptic cylinder of soft tissue, ~40 HU, in a subcutaneous fat ring, ~-100 HU, in air,
-1000 HU) holding organ-like structures of randomised shape, size, contrast and position: a "liver" (large, 60 HU,
label 1), a "kidney" pair (~150 HU after contrast, label 2), a "spleen" (small, 45–70 HU, label 3), and a spine
(bone, ~400 HU, unlabeled distractor). Gaussian noise and a mild blur mimic a scanner; spacing is anisotropic
(thick slices). Unlabeled volumes are drawn from the same distribution.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


def _ellipsoid(grid: Tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float],
               wobble: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a randomly deformed ellipsoid (physical mm coordinates)."""
    z, y, x = grid
    d = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    if wobble > 0:
        k = rng.uniform(0.5, 1.5, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        d = d * (1 + wobble * np.sin(k[0] * y / radii[1] + ph[0]) * np.sin(k[1] * x / radii[2] + ph[1])
                 * np.cos(k[2] * z / radii[0] + ph[2]))
    return d <= 1.0


def make_case(shape: Sequence[int] = (32, 64, 64), spacing: Sequence[float] = (2.5, 1.0, 1.0),
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image float32 HU, labels uint8)``, both ``(Z, Y, X)``."""
    rng = rng or np.random.default_rng()
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)], indexing="ij")
    ext = [n * s for n, s in zip(shape, spacing)]
    cy, cx = ext[1] / 2 + rng.uniform(-3, 3), ext[2] / 2 + rng.uniform(-3, 3)
    ry, rx = ext[1] * rng.uniform(0.36, 0.44), ext[2] * rng.uniform(0.42, 0.48)
    img = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    body_d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    img[body_d <= 1.0] = -100.0
    img[body_d <= 0.8] = 40.0
    grid = (zz, yy, xx)
    # spine: a bone cylinder at the back
    spine = ((yy - (cy + 0.65 * ry)) / 6.0) ** 2 + ((xx - cx) / 7.0) ** 2 <= 1.0
    img[spine] = 400.0
    organs = [
        ("liver", (0.5, -0.1, -0.45), (0.45, 0.45, 0.35), 0.2, (55, 70)),
        ("spleen", (0.5, 0.15, 0.5), (0.25, 0.22, 0.18), 0.15, (40, 75)),
        ("kidney", (0.5, 0.35, -0.3), (0.22, 0.14, 0.1), 0.1, (130, 180)),
        ("kidney", (0.5, 0.35, 0.3), (0.22, 0.14, 0.1), 0.1, (130, 180)),
    ]
    for name, rel_c, rel_r, wob, hu in organs:
        c = (ext[0] * rel_c[0] + rng.uniform(-0.08, 0.08) * ext[0], cy + rel_c[1] * ry + rng.uniform(-3, 3),
             cx + rel_c[2] * rx + rng.uniform(-3, 3))
        r = [max(rr * e * rng.uniform(0.8, 1.2), 2.5 * s) for rr, e, s in
             zip(rel_r, (ext[0], ry * 2, rx * 2), spacing)]
        m = _ellipsoid(grid, c, r, wob, rng) & (body_d <= 0.8) & ~spine
        img[m] = rng.uniform(*hu)
        lab[m] = LABELS[name]
    # a few small bright vessels/lesions as distractors
    for _ in range(rng.integers(1, 4)):
        c = (rng.uniform(0, ext[0]), cy + rng.uniform(-0.5, 0.5) * ry, cx + rng.uniform(-0.5, 0.5) * rx)
        m = _ellipsoid(grid, c, [rng.uniform(2, 5)] * 3, 0.0, rng) & (body_d <= 0.8)
        img[m] = rng.uniform(80, 200)
    # scanner: blur in-plane a little, then noise
    img = 0.5 * img + 0.125 * (np.roll(img, 1, 1) + np.roll(img, -1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 2))
    img += rng.normal(0, rng.uniform(8, 20), size=shape).astype(np.float32)
    return img.astype(np.float32), lab


def _write(arr: np.ndarray, spacing: Sequence[float], path: str) -> None:
    import SimpleITK as sitk  # local import: only the glue needs it
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK: (x, y, z)
    sitk.WriteImage(im, path)


def make_dataset(raw_root: str, dataset_id: int = 990, name: str = "PGLSynth", num_train: int = 8,
                 num_unlabeled: int = 0, unlabeled_dir: Optional[str] = None, shape: Sequence[int] = (32, 64, 64),
                 spacing: Sequence[float] = (2.5, 1.0, 1.0), seed: int = 0,
                 unlabeled_formats: Sequence[str] = (".nii.gz",)) -> Dict[str, str]:
    """Write ``Dataset{id:03d}_{name}`` (imagesTr/labelsTr/dataset.json) under ``raw_root``.

    Unlabeled volumes (if any) go to ``unlabeled_dir`` (default: ``unlabeled_<dataset>`` beside ``raw_root``, never
    inside it: nnU-Net would take a ``DatasetXXX_*`` folder there for a second dataset of the same id), cycling
    through ``unlabeled_formats`` (e.g. ``.nii.gz``, ``.nrrd``, ``.mha``). Returns the folders written.
    """
    rng = np.random.default_rng(seed)
    ds = f"Dataset{dataset_id:03d}_{name}"
    root = os.path.join(raw_root, ds)
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    for i in range(num_train):
        img, lab = make_case(shape, spacing, rng)
        _write(img, spacing, os.path.join(root, "imagesTr", f"case_{i:03d}_0000.nii.gz"))
        _write(lab, spacing, os.path.join(root, "labelsTr", f"case_{i:03d}.nii.gz"))
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": num_train,
                   "file_ending": ".nii.gz", "name": name,
                   "description": "synthetic abdominal-CT-like phantoms made by nnunet_pgl"}, f, indent=2)
    out = {"dataset": root}
    if num_unlabeled:
        ud = unlabeled_dir or os.path.join(os.path.dirname(os.path.abspath(raw_root)), f"unlabeled_{ds}")
        os.makedirs(ud, exist_ok=True)
        for i in range(num_unlabeled):
            img, _ = make_case(shape, spacing, rng)
            _write(img, spacing, os.path.join(ud, f"unl_{i:03d}{unlabeled_formats[i % len(unlabeled_formats)]}"))
        out["unlabeled"] = ud
    return out
