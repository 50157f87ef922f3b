"""Per-case preprocessing (runs in worker processes): nnU-Net's reader and preprocessor, written with nnU-Net's
blosc2 writer under temporary names.

Each case is read with the dataset's reader (files of another format, e.g. NRRD in a NIfTI dataset, with
``SimpleITKIO``) and passed through the plans' preprocessor (``run_case_npy`` without a segmentation), exactly as
``DefaultPreprocessor.run_case`` does for a test image, then saved as ``DefaultPreprocessor.run_case_save`` does.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
from typing import Any, Dict, List, Sequence, Tuple, Type

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_pgl.pretraining.atomic import fsync_file, remove_quietly
from .cache import CASE_FILE_SUFFIXES, TMP_PREFIX
from .errors import VANISHED

NOT_HU = "does not look like CT in Hounsfield units"


def reader_class_for(files: Sequence[str], dataset_reader: Type) -> Type:
    """The dataset's reader when it supports every file's ending, else SimpleITK (with reorientation if the
    dataset's reader reorients, so that both give the same array orientation)."""
    endings = [e.lower() for e in getattr(dataset_reader, "supported_file_endings", [])]
    if all(any(f.lower().endswith(e) for e in endings) for f in files):
        return dataset_reader
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient
    return SimpleITKIOWithReorient if "Reorient" in dataset_reader.__name__ else SimpleITKIO


@functools.lru_cache(maxsize=None)
def is_ct_normalization(scheme: str) -> bool:
    """Whether nnU-Net's normalization ``scheme`` is ``CTNormalization`` or a subclass of it."""
    import nnunetv2
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    try:
        cls = recursive_find_python_class(join(nnunetv2.__path__[0], "preprocessing", "normalization"), scheme,
                                          "nnunetv2.preprocessing.normalization")
    except Exception:
        cls = None
    return (cls is not None and issubclass(cls, CTNormalization)) or scheme == "CTNormalization"


def channel_names_of(dataset_json: dict) -> List[str]:
    """The dataset's channel names, in channel order."""
    return list((dataset_json.get("channel_names") or dataset_json.get("modality") or {}).values())


def intensity_warnings(files: Sequence[str], data: np.ndarray, configuration_manager,
                       channel_names: Sequence[str]) -> List[str]:
    """One short line per CT-normalized channel whose raw intensities do not look like Hounsfield units (the
    explanation is added once per run, by ``report.report``)."""
    out = []
    for c, scheme in enumerate(configuration_manager.normalization_schemes):
        if c >= data.shape[0] or not is_ct_normalization(scheme):
            continue
        v = data[c].ravel()
        v = v[::max(1, v.size // 2_000_000)]
        p1, mx = float(np.percentile(v, 1)), float(data[c].max())
        if p1 > -500 or mx < 200:
            out.append(f"{files[c]}: channel {c} ({channel_names[c] if c < len(channel_names) else '?'}) "
                       f"{NOT_HU} (1st percentile {p1:.0f}, max {mx:.0f})")
    return out


def ct_normalization_note(configuration_manager, plans_manager, channel_names: Sequence[str]) -> str:
    """How the dataset normalizes its CT channels, e.g. ``channel 0 (CT) with CTNormalization (clip to [-1000,
    400], then z-score)``: the reason why images in other intensity ranges are flattened."""
    fg = plans_manager.foreground_intensity_properties_per_channel
    parts = []
    for c, scheme in enumerate(configuration_manager.normalization_schemes):
        if not is_ct_normalization(scheme):
            continue
        props = fg.get(str(c), {}) if isinstance(fg, dict) else {}
        clip = f" to [{props['percentile_00_5']:.0f}, {props['percentile_99_5']:.0f}]" \
            if "percentile_00_5" in props else ""
        parts.append(f"channel {c} ({channel_names[c] if c < len(channel_names) else '?'}) with {scheme} "
                     f"(clip{clip}, then z-score)")
    return ", ".join(parts)


class _Unusable(Exception):
    """The case cannot be used; the message is the reason."""


def _read(files: Tuple[str, ...], rw_cls: Type) -> Tuple[np.ndarray, Dict[str, Any], List[str]]:
    """The image, its properties and a line with the reader's printed messages (if any); :class:`_Unusable` when
    the reader fails (:data:`~.errors.VANISHED` if a file no longer exists)."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # nnU-Net's readers print their complaints before raising
            data, properties = rw_cls().read_images(list(files))
    except Exception as e:
        if not all(os.path.exists(p) for p in files):
            raise _Unusable(VANISHED) from None
        detail = " ".join(said.getvalue().split())[:300]
        raise _Unusable(f"{rw_cls.__name__} failed to read it ({type(e).__name__}: {e}"
                        f"{'; ' + detail if detail else ''})") from None
    warn = []
    if said.getvalue().strip():
        warn.append(f"{', '.join(files)}: {rw_cls.__name__} said: {' '.join(said.getvalue().split())[:300]}")
    return data, properties, warn


def _check_usable(data: np.ndarray, n_files: int, rw_cls: Type) -> None:
    """:class:`_Unusable` for an array of another shape, of zeros only, or with NaN/Inf voxels."""
    if data.ndim != 4 or data.shape[0] != n_files:
        raise _Unusable(f"{rw_cls.__name__} read an array of shape {data.shape}, expected ({n_files}, Z, Y, X)")
    if not np.any(data):
        raise _Unusable("every voxel is 0 (an empty image)")
    if not np.all(np.isfinite(data)):
        raise _Unusable(f"{int(np.sum(~np.isfinite(data)))} voxel(s) are NaN or Inf: fix the export (a NaN in the "
                        f"input makes every loss NaN)")


def preprocess_case(files: Tuple[str, ...], case_id: str, sha256: str, out_folder: str, token: str,
                    plans_manager, configuration_manager, dataset_json: dict) -> Dict[str, Any]:
    """Read, preprocess and write one case under temporary names (fsynced).

    Returns ``{'status': 'ok', 'tmp_prefix', 'shape', 'warnings'}``, or ``{'status': 'skip', 'reason'}`` when the
    reader fails on the files (``reason`` is :data:`~.errors.VANISHED` if a file no longer exists), the image is
    empty (all zeros) or has NaN/Inf voxels. Any other error propagates (after removing the temporary files).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    rw_cls = reader_class_for(files, plans_manager.image_reader_writer_class)
    try:
        data, properties, warn = _read(files, rw_cls)
        _check_usable(data, len(files), rw_cls)
    except _Unusable as e:
        return {"status": "skip", "reason": str(e)}
    warn += intensity_warnings(files, data, configuration_manager, channel_names_of(dataset_json))

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case_npy(data, None, properties, plans_manager, configuration_manager,
                                                      dataset_json)
    properties["class_locations"] = {}
    properties["pgl_source"] = list(files)
    properties["pgl_sha256"] = sha256
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    # exactly as DefaultPreprocessor.run_case_save
    block_size_data, chunk_size_data = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size),
                                                          data.itemsize)
    block_size_seg, chunk_size_seg = comp_blosc2_params(seg.shape, tuple(configuration_manager.patch_size),
                                                        seg.itemsize)
    prefix = join(out_folder, f"{TMP_PREFIX}{token}-{case_id}")
    tmp_files = [prefix + s for s in CASE_FILE_SUFFIXES]
    try:
        nnUNetDatasetBlosc2.save_case(data, seg, properties, prefix, chunks=chunk_size_data, blocks=block_size_data,
                                      chunks_seg=chunk_size_seg, blocks_seg=block_size_seg)
        for p in tmp_files:
            fsync_file(p)
    except BaseException:
        remove_quietly(tmp_files)
        raise
    return {"status": "ok", "tmp_prefix": prefix, "shape": list(data.shape), "warnings": warn}
