"""The checkpoint contract between ``pgl_pretrain`` and the fine-tuning trainers, in one place.

* **Methods**: :data:`METHODS` maps each ``--method`` to its pretrainer class, whose name is also its output folder's
  trainer part. Fine-tuning trainers declare the method they need (``pgl_method``).
* **Where**: a pretraining of plans ``P``, configuration ``C`` writes
  ``$nnUNet_results/<Dataset>/<pretrainer>__<P>__<C>/fold_<K|all>/checkpoint_final.pth`` (nnU-Net's own
  ``get_output_folder``), fold K being ``--exclude-fold K``. :func:`choose_pgl_checkpoint` is where a fine-tuning run
  looks, in order: ``$nnUNet_pgl_weights``, ``fold_K``, ``fold_all`` (a fallback with possible leakage), and the
  dataset a ``pgl_transfer`` record names.
* **What**: ``pgl_meta`` (:func:`build_meta`) records the plans fields the weights depend on; :func:`check_pgl_meta`
  refuses a checkpoint whose architecture fields differ and warns where only the preprocessing differs
  (:func:`preprocessing_mismatches`). :func:`read_pgl_checkpoint` loads one with a message that says what to do.
* **Hashes**: :func:`file_hash` is the stat-cached sha256 of the pretrainer's case record; :func:`sha256_of_files`
  hashes files concatenated (a multi-file image), as unlabeled ingestion and ``pgl_compare``'s leakage guard do.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.paths import nnUNet_results
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier, get_output_folder
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

import nnunet_pgl

META_FORMAT = 1
WEIGHTS_ENV = "nnUNet_pgl_weights"
FINAL_CHECKPOINT = "checkpoint_final.pth"
#: pgl_transfer's record: one JSON file per target dataset, plans and configuration, named in nnU-Net's
#: ``<trainer>__<plans>__<configuration>`` scheme with this in place of the trainer
TRANSFER_RECORD = "pgl_transfer"


@dataclass(frozen=True)
class Method:
    """A pretraining method: its ``--method`` name and the pretrainer class (and output folder) that runs it."""

    name: str
    pretrainer: str


METHODS: Dict[str, Method] = {m.name: m for m in (Method("pgl", "nnUNetPretrainerPGL"),
                                                  Method("byol", "nnUNetPretrainerBYOL"),
                                                  Method("pgl+byol", "nnUNetPretrainerPGLBYOL"))}
#: trainer class name per method; each method gets its own output folder
PRETRAINER_BY_METHOD: Dict[str, str] = {m.name: m.pretrainer for m in METHODS.values()}


def method_of_pretrainer(pretrainer: str) -> str:
    """The ``--method`` whose pretrainer class is ``pretrainer`` (KeyError for other names)."""
    return next(m.name for m in METHODS.values() if m.pretrainer == pretrainer)


class PGLCheckpointError(RuntimeError):
    """The PGL checkpoint is missing, unreadable or made for other plans; the message says what to run."""


# ------------------------------------------------------------------------------------------------------ where
def pretrain_command(dataset: str, configuration: str, plans: str, pretrainer: str) -> str:
    """The ``pgl_pretrain`` command line that writes ``pretrainer``'s checkpoint for these plans."""
    method = method_of_pretrainer(pretrainer)
    return f"pgl_pretrain -d {dataset} -c {configuration} -p {plans}{'' if method == 'pgl' else ' --method ' + method}"


def pretraining_folder(dataset_name: str, pretrainer: str, plans_name: str, configuration: str,
                       fold: Union[int, str]) -> str:
    """``pgl_pretrain``'s output folder: fold K = ``--exclude-fold K``, ``'all'`` = none."""
    return get_output_folder(dataset_name, pretrainer, plans_name, configuration, fold)


def pretraining_checkpoint(dataset_name: str, plans_name: str, configuration: str, pretrainer: str,
                           fold: Union[int, str]) -> str:
    """``checkpoint_final.pth`` of :func:`pretraining_folder`."""
    return join(pretraining_folder(dataset_name, pretrainer, plans_name, configuration, fold), FINAL_CHECKPOINT)


def transfer_record_path(dataset_name: str, plans_name: str, configuration: str) -> str:
    """``$nnUNet_results/<Dataset>/pgl_transfer__<plans>__<configuration>.json`` (see ``pgl_transfer``)."""
    return join(str(nnUNet_results), dataset_name,
                convert_trainer_plans_config_to_identifier(TRANSFER_RECORD, plans_name, configuration) + ".json")


def read_transfer_record(path: str) -> Dict[str, Any]:
    """The record ``pgl_transfer`` wrote, or :class:`PGLCheckpointError` saying what to do."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise PGLCheckpointError(f"cannot read the pgl_transfer record {path}: {type(e).__name__}: {e}. Run "
                                 "pgl_transfer again (it rewrites the record), or delete the file") from None
    missing = [k for k in ("source_dataset", "source_plans", "configuration")
               if not isinstance(rec, dict) or not isinstance(rec.get(k), str)]
    if missing:
        raise PGLCheckpointError(f"{path} is not a pgl_transfer record (no {', '.join(missing)}). Run pgl_transfer "
                                 "again (it rewrites the record), or delete the file")
    return rec


@dataclass
class CheckpointChoice:
    """The PGL checkpoint of a fine-tuning run, and why it was chosen.

    Attributes:
        path: the checkpoint file.
        source: ``'environment variable'``, ``'fold_K'``, ``'fold_all'`` or ``'transferred'``.
        why: one line for the training log.
        fallback: True when fold K uses ``fold_all`` for want of a finished ``fold_K`` (possible leakage).
    """

    path: str
    source: str
    why: str
    fallback: bool = False


def _from_env(trainer_name: str) -> Optional[CheckpointChoice]:
    env = os.environ.get(WEIGHTS_ENV)
    if not env:
        return None
    if not isfile(env):
        raise PGLCheckpointError(f"{trainer_name} needs a PGL checkpoint, and {WEIGHTS_ENV}={env} does not exist. "
                                 f"Point it to a {FINAL_CHECKPOINT}, or unset it to use the pgl_pretrain outputs")
    return CheckpointChoice(env, "environment variable",
                            f"the environment variable {WEIGHTS_ENV} (it overrides the pgl_pretrain outputs)")


def _from_fold(dataset: str, plans_name: str, configuration: str, fold: Union[int, str], pretrainer: str,
               fix: str) -> "tuple[Optional[CheckpointChoice], str]":
    """``fold_K`` if finished, else (None, why not)."""
    if fold == "all":
        return None, ""
    p = pretraining_checkpoint(dataset, plans_name, configuration, pretrainer, fold)
    if isfile(p):
        return CheckpointChoice(p, f"fold_{fold}", f"fold_{fold}, the pretraining for fold {fold} (pgl_pretrain "
                                f"--exclude-fold {fold} or --folds), which left fold {fold}'s validation cases out"), ""
    if isfile(join(os.path.dirname(p), "checkpoint_latest.pth")):
        return None, (f"the pretraining for fold {fold} is unfinished ({os.path.dirname(p)} has no "
                      f"{FINAL_CHECKPOINT}; resume it: {fix} --exclude-fold {fold} --c)")
    return None, f"there is no pretraining for fold {fold} ({p} does not exist)"


def _from_transfer(dataset: str, plans_name: str, configuration: str, pretrainer: str,
                   trainer_name: str) -> Optional[CheckpointChoice]:
    record = transfer_record_path(dataset, plans_name, configuration)
    if not isfile(record):
        return None
    rec = read_transfer_record(record)
    src = pretraining_checkpoint(rec["source_dataset"], rec["source_plans"], configuration, pretrainer, "all")
    if not isfile(src):
        raise PGLCheckpointError(
            f"{trainer_name} needs a PGL checkpoint: {record} (written by pgl_transfer) says these plans come from "
            f"{rec['source_dataset']} (plans {rec['source_plans']}), but its pretraining {src} does not exist. "
            f"Run: {pretrain_command(rec['source_dataset'], configuration, rec['source_plans'], pretrainer)} (or "
            f"set {WEIGHTS_ENV})")
    return CheckpointChoice(src, "transferred", f"transferred: {record} (written by pgl_transfer) names the "
                            f"pretraining of {rec['source_dataset']} with plans {rec['source_plans']}")


def choose_pgl_checkpoint(plans: dict, configuration: str, fold: Union[int, str], pretrainer: str,
                          trainer_name: str = "nnUNetTrainerPGL") -> CheckpointChoice:
    """The checkpoint a fine-tuning run of ``fold`` uses: ``$nnUNet_pgl_weights``, else ``fold_K`` of the
    pretrainer's folder, else its ``fold_all``, else the pretraining a ``pgl_transfer`` record names.

    Raises :class:`PGLCheckpointError` naming what was looked for and the command that makes it.
    """
    dataset, plans_name = plans["dataset_name"], plans["plans_name"]
    choice = _from_env(trainer_name)
    if choice is not None:
        return choice
    fix = pretrain_command(dataset, configuration, plans_name, pretrainer)
    if not nnUNet_results:
        raise PGLCheckpointError(f"{trainer_name} needs a PGL checkpoint: set nnUNet_results (where {fix} writes "
                                 f"it) or {WEIGHTS_ENV}")
    choice, note = _from_fold(dataset, plans_name, configuration, fold, pretrainer, fix)
    if choice is not None:
        return choice
    p = pretraining_checkpoint(dataset, plans_name, configuration, pretrainer, "all")
    if isfile(p):
        if fold == "all":
            return CheckpointChoice(p, "fold_all", "fold_all, the pretraining without --exclude-fold, for the run on "
                                    "fold 'all'")
        return CheckpointChoice(p, "fold_all", f"fold_all, because {note}", fallback=True)
    choice = _from_transfer(dataset, plans_name, configuration, pretrainer, trainer_name)
    if choice is not None:
        return choice
    per_fold = (f", or {fix} --folds 0 1 2 3 4 for one pretraining per fold (leakage-free cross-validation)"
                if fold != "all" else "")
    raise PGLCheckpointError(
        f"{trainer_name} needs a PGL checkpoint, and the pgl_pretrain output {p} does not exist"
        f"{' (' + note + ')' if note else ''}. Run: {fix}{per_fold} (or set {WEIGHTS_ENV} to a {FINAL_CHECKPOINT}, "
        f"or use another dataset's pretraining: pgl_transfer -s SOURCE -t {dataset})")


# ------------------------------------------------------------------------------------------------------- what
def read_pgl_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint (CPU, tensors and builtins only; memory-mapped, so that reading ``pgl_meta`` alone does not
    read the weights, the EMA target and the optimiser state) or raise :class:`PGLCheckpointError` saying why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects, ...
        raise PGLCheckpointError(
            f"cannot read the PGL checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. It is "
            "truncated or not a checkpoint written by pgl_pretrain. Re-run pgl_pretrain (add --c to resume), or set "
            f"{WEIGHTS_ENV} to a complete {FINAL_CHECKPOINT}") from None


#: the pgl_meta fields that must equal the current plans' for the weights to fit and mean the same thing
CHECKED_FIELDS = ("network_class", "architecture_fingerprint", "patch_size", "num_input_channels",
                  "normalization_schemes")


def check_pgl_meta(ckpt: Dict[str, Any], path: str, plans: dict, configuration: str, dataset_json: dict,
                   pretrainer: str = "nnUNetPretrainerPGL") -> List[str]:
    """Raise :class:`PGLCheckpointError` naming the first architecture field where ``pgl_meta`` differs from these
    plans (the message gives the ``pgl_pretrain`` command of ``pretrainer``, the one the caller reads); return the
    warnings about target spacing and CT normalisation (:func:`preprocessing_mismatches`)."""
    fix = pretrain_command(plans["dataset_name"], configuration, plans["plans_name"], pretrainer)
    meta = ckpt.get("pgl_meta") if isinstance(ckpt, dict) else None
    if meta is None:
        who = ckpt.get("trainer_name", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise PGLCheckpointError(
            f"{path} is not a PGL checkpoint (no 'pgl_meta'; written by trainer {who}). To start from an nnU-Net "
            f"checkpoint use nnUNetv2_train ... -pretrained_weights with the stock nnUNetTrainer; to pretrain with "
            f"PGL run: {fix}")
    pm = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
    cm = pm.get_configuration(configuration)
    here = plans_meta(pm, configuration, determine_num_input_channels(pm, cm, dataset_json))
    for field_name in CHECKED_FIELDS:
        if meta.get(field_name) != here[field_name]:
            raise PGLCheckpointError(
                f"the PGL checkpoint {path} does not fit these plans: '{field_name}' is {meta.get(field_name)!r} in "
                f"the checkpoint (pretrained with plans '{meta.get('plans_identifier')}', configuration "
                f"'{meta.get('configuration')}') but {here[field_name]!r} here (plans '{plans['plans_name']}', "
                f"configuration '{configuration}'). Pretrain for these plans: {fix} (or point {WEIGHTS_ENV} to a "
                "matching checkpoint)")
    return preprocessing_mismatches(meta, here)


def _close(a: Any, b: Any) -> bool:
    try:
        return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
                                        for x, y in zip(a, b))
    except TypeError:
        return False


def _g(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _ct(stats: Optional[Dict[str, float]]) -> str:
    if stats is None:
        return "no CT normalisation"
    return (f"clip [{stats['percentile_00_5']:.6g}, {stats['percentile_99_5']:.6g}], mean {stats['mean']:.6g}, "
            f"std {stats['std']:.6g}")


def preprocessing_mismatches(meta: Dict[str, Any], here: Dict[str, Any]) -> List[str]:
    """Where the checkpoint was preprocessed otherwise than these plans preprocess, with both values: the target
    spacing, and per CT-normalised channel the clip bounds, mean and std. The weights still fit (a warning, not a
    refusal); fields an older ``pgl_meta`` lacks are not compared."""
    src = f"plans '{meta.get('plans_identifier')}' of {meta.get('dataset_name')}"
    dst = f"plans '{here['plans_identifier']}' of {here['dataset_name']}"
    out: List[str] = []
    if meta.get("spacing") is not None and not _close(meta["spacing"], here["spacing"]):
        out.append(f"target spacing {_g(meta['spacing'])} in the PGL checkpoint ({src}) but {_g(here['spacing'])} "
                   f"here ({dst}): the network sees other voxel sizes than it was pretrained on")
    theirs, ours = meta.get("ct_normalization"), here.get("ct_normalization") or {}
    if theirs is not None:
        for ch in sorted(set(theirs) | set(ours), key=lambda c: int(c)):
            a, b = theirs.get(ch), ours.get(ch)
            if a is None or b is None or not _close([a[k] for k in CT_STATS], [b[k] for k in CT_STATS]):
                out.append(f"CT normalisation of channel {ch}: {_ct(a)} in the PGL checkpoint ({src}) but {_ct(b)} "
                           f"here ({dst}): the same intensities reach the network as other values than in pretraining")
    return out



def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def architecture_fingerprint(configuration_manager: ConfigurationManager) -> str:
    """sha256 of the network class, its kwargs and the patch size: equal iff the same weights fit."""
    return _digest({"network_class": configuration_manager.network_arch_class_name,
                    "arch_kwargs": configuration_manager.network_arch_init_kwargs,
                    "patch_size": list(configuration_manager.patch_size)})


#: the intensity statistics that nnU-Net's CTNormalization applies (clip bounds, mean, std)
CT_STATS = ("percentile_00_5", "percentile_99_5", "mean", "std")


def ct_normalization(plans_manager: PlansManager, configuration_name: str) -> Dict[str, Dict[str, float]]:
    """``{channel: {percentile_00_5, percentile_99_5, mean, std}}`` of the channels the plans CT-normalise."""
    cm = plans_manager.get_configuration(configuration_name)
    props = plans_manager.plans.get("foreground_intensity_properties_per_channel") or \
        plans_manager.plans.get("foreground_intensity_properties_by_modality") or {}
    return {str(c): {k: float(props[str(c)][k]) for k in CT_STATS}
            for c, scheme in enumerate(cm.normalization_schemes)
            if scheme == "CTNormalization" and str(c) in props}


def plans_meta(plans_manager: PlansManager, configuration_name: str, num_input_channels: int) -> Dict[str, Any]:
    """The fields of ``pgl_meta`` that fine-tuning compares against its own plans."""
    cm = plans_manager.get_configuration(configuration_name)
    return {
        "plans_identifier": plans_manager.plans_name,
        "dataset_name": plans_manager.dataset_name,
        "configuration": configuration_name,
        "network_class": cm.network_arch_class_name,
        "architecture_fingerprint": architecture_fingerprint(cm),
        "patch_size": [int(p) for p in cm.patch_size],
        "num_input_channels": int(num_input_channels),
        "normalization_schemes": list(cm.normalization_schemes),
        "spacing": [float(s) for s in cm.spacing],
        "ct_normalization": ct_normalization(plans_manager, configuration_name),
    }


def dist_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``'unknown'``."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def build_meta(plans_manager: PlansManager, configuration_name: str, num_input_channels: int, method: str,
               levels: Sequence[int], cases: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``pgl_meta``: :func:`plans_meta`, the method and levels, the versions and the pretraining's cases."""
    import nnunetv2
    return {"format": META_FORMAT, **plans_meta(plans_manager, configuration_name, num_input_channels),
            "method": method, "levels": [int(x) for x in levels],
            "nnunetv2_version": getattr(nnunetv2, "__version__", None) or dist_version("nnunetv2"),
            "nnunet_pgl_version": nnunet_pgl.__version__, "cases": cases}


# ------------------------------------------------------------------------------------------------------ hashes
def sha256_of_files(paths: Sequence[str]) -> str:
    """sha256 of the files' bytes concatenated in the given order (one image stored as several files)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def file_hash(path: str, cache: Dict[str, Any]) -> str:
    """sha256 of a file's bytes; ``cache`` maps path → {size, mtime, sha256} and is updated (a hit when the
    size and mtime are unchanged)."""
    st = os.stat(path)
    hit = cache.get(path)
    if hit and hit["size"] == st.st_size and hit["mtime"] == st.st_mtime:
        return str(hit["sha256"])
    digest = sha256_of_files([path])
    cache[path] = {"size": st.st_size, "mtime": st.st_mtime, "sha256": digest}
    return digest
