"""Synthetic abdominal-CT-like phantoms in nnU-Net's raw dataset layout (for tests and ``pgl_demo``).

Each case is a transverse section of an abdomen in the portal-venous phase, in HU: air (-1000) around a body (an
elliptic cylinder) of subcutaneous fat (~-100) holding soft tissue (25–45, with a smooth low-frequency texture:
bowel, muscle), a vertebral body (bone, 300–500, unlabelled) with the aorta in front of it (150–250, an unlabelled
distractor as bright as the kidneys), and organ-like structures of randomised shape, size, contrast and position:
a "liver" (large, 85–115, patient's right = image left, label 1), a "kidney" on each side of the spine (170–230,
in a rim of perirenal fat, lower slices, label 2) and a "spleen" (120–150, a little brighter than the liver as in
early portal-venous scans, posterolateral left, upper slices, label 3). Organs are drawn kidneys → spleen →
liver, each only where no earlier organ is, so they abut without overlapping. A few small bright blobs (vessels,
lesions; unlabelled), a mild in-plane blur and Gaussian noise (σ 8–20 HU) mimic a scanner; spacing is anisotropic
(thick slices). Unlabeled volumes come from the same distribution.

Sizes are relative to the body, so the phantom keeps its anatomy at any ``shape``/``spacing``; structures are at
least ~2.5 voxels across in every axis. The contrasts are chosen so that a few minutes of CPU training already
learn all three classes (the spleen is told from the liver by brightness as well as by place, since nnU-Net's
mirroring augmentation removes left/right).
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


def _smooth_texture(grid: Tuple[np.ndarray, ...], ext: Sequence[float], amplitude: float,
                    rng: np.random.Generator, waves: int = 4) -> np.ndarray:
    """A smooth random field (sum of a few plane waves of 1–3 periods per image), zero mean, ~``amplitude`` HU."""
    out = np.zeros(grid[0].shape, dtype=np.float32)
    for _ in range(waves):
        k = rng.uniform(1, 3, size=3) * 2 * np.pi / np.asarray(ext) * rng.choice([-1, 1], size=3)
        out += np.cos(k[0] * grid[0] + k[1] * grid[1] + k[2] * grid[2] + rng.uniform(0, 2 * np.pi))
    return out * (amplitude / np.sqrt(waves / 2))


#: name, relative centre (z of the volume; y, x of the body's half axes from its centre), relative radii (z of the
#: volume; y, x of the body's full axes), wobble, HU range. Image x grows towards the patient's left.
ORGANS = (
    ("kidney", (0.62, 0.42, -0.36), (0.22, 0.14, 0.09), 0.1, (170, 230)),
    ("kidney", (0.62, 0.42, 0.36), (0.22, 0.14, 0.09), 0.1, (170, 230)),
    ("spleen", (0.35, 0.12, 0.6), (0.28, 0.22, 0.14), 0.15, (120, 150)),
    ("liver", (0.45, -0.1, -0.42), (0.45, 0.42, 0.32), 0.2, (85, 115)),
)


def make_case(shape: Sequence[int] = (32, 64, 64), spacing: Sequence[float] = (2.5, 1.0, 1.0),
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image float32 HU, labels uint8)``, both ``(Z, Y, X)``."""
    rng = rng or np.random.default_rng()
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)], indexing="ij")
    grid = (zz, yy, xx)
    ext = [n * s for n, s in zip(shape, spacing)]
    cy, cx = ext[1] / 2 + rng.uniform(-0.05, 0.05) * ext[1], ext[2] / 2 + rng.uniform(-0.05, 0.05) * ext[2]
    ry, rx = ext[1] * rng.uniform(0.36, 0.44), ext[2] * rng.uniform(0.42, 0.48)
    img = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    body_d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    inner = body_d <= rng.uniform(0.72, 0.85)                     # inside the subcutaneous fat
    img[body_d <= 1.0] = rng.uniform(-120, -80)
    img[inner] = rng.uniform(25, 45) + _smooth_texture(grid, ext, rng.uniform(5, 12), rng)[inner]
    # vertebral body at the back, the aorta in front of it (bright, unlabelled: shape and place tell it apart)
    sy, sx = cy + 0.62 * ry, cx + rng.uniform(-0.03, 0.03) * rx
    spine = ((yy - sy) / (0.17 * ry)) ** 2 + ((xx - sx) / (0.15 * rx)) ** 2 <= 1.0
    img[spine] = rng.uniform(300, 500)
    ar = rng.uniform(0.06, 0.08) * rx
    aorta = ((yy - (sy - 0.17 * ry - 1.3 * ar)) ** 2 + (xx - (sx + 0.1 * rx)) ** 2) <= ar ** 2
    img[aorta & inner] = rng.uniform(150, 250)
    taken = spine | aorta | ~inner
    for name, rel_c, rel_r, wob, hu in ORGANS:
        c = (ext[0] * (rel_c[0] + rng.uniform(-0.08, 0.08)), cy + ry * (rel_c[1] + rng.uniform(-0.06, 0.06)),
             cx + rx * (rel_c[2] + rng.uniform(-0.06, 0.06)))
        r = [max(rr * e * rng.uniform(0.8, 1.2), 1.25 * s) for rr, e, s in
             zip(rel_r, (ext[0], ry * 2, rx * 2), spacing)]
        m = _ellipsoid(grid, c, r, wob, rng) & ~taken
        if name == "kidney":  # perirenal fat: a rim around the kidney
            rim = _ellipsoid(grid, c, [rr * 1.3 for rr in r], 0.0, rng) & ~taken & ~m
            img[rim] = rng.uniform(-110, -70)
        img[m] = rng.uniform(*hu)
        lab[m] = LABELS[name]
        taken |= m
    # a few small bright vessels/lesions as distractors (inside organs too: unlabelled, as lesions would be)
    for _ in range(rng.integers(1, 4)):
        c = (rng.uniform(0, ext[0]), cy + rng.uniform(-0.5, 0.5) * ry, cx + rng.uniform(-0.5, 0.5) * rx)
        m = _ellipsoid(grid, c, [rng.uniform(0.04, 0.1) * rx] * 3, 0.0, rng) & inner & ~spine
        img[m] = rng.uniform(80, 200)
    # scanner: blur in-plane a little, then noise
    img = 0.5 * img + 0.125 * (np.roll(img, 1, 1) + np.roll(img, -1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 2))
    img += rng.normal(0, rng.uniform(8, 20), size=shape).astype(np.float32)
    return img.astype(np.float32), lab


def write_image(arr: np.ndarray, spacing: Sequence[float], path: str) -> None:
    """Write a (Z, Y, X) array as an image file of that spacing (mm, same order); the format follows the suffix."""
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
        write_image(img, spacing, os.path.join(root, "imagesTr", f"case_{i:03d}_0000.nii.gz"))
        write_image(lab, spacing, os.path.join(root, "labelsTr", f"case_{i:03d}.nii.gz"))
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
            write_image(img, spacing, os.path.join(ud, f"unl_{i:03d}{unlabeled_formats[i % len(unlabeled_formats)]}"))
        out["unlabeled"] = ud
    return out
