"""``pgl_transfer``: fine-tune another dataset from one PGL pretraining, the way nnU-Net shares an architecture.

``pgl_transfer -s A -t B [-p P] [-c C] [-tp P_A] [-np N]`` does what nnU-Net documents for pretraining on one dataset
and fine-tuning on another, with nnU-Net's own functions, and adds the record that lets the PGL trainers find the
checkpoint:

1. checks, before writing anything: A planned with plans ``P`` holding the 3D configuration ``C``; B in
   ``nnUNet_raw``; A and B have the same number of input channels; A's PGL checkpoints (if any) fit A's plans; and
   B's plans ``P_A``, if they exist already, are A's (not another dataset's);
2. B's fingerprint (``nnUNetv2_extract_fingerprint``, with nnU-Net's dataset check) if B has none yet, and B's
   ``dataset.json`` beside its plans, where nnU-Net's planner puts it (preprocessing reads it there);
3. ``move_plans_between_datasets(A, B, P, P_A)`` (``nnUNetv2_move_plans_between_datasets``): B gets A's plans as
   ``P_A`` — A's patch size, network topology, target spacing and CT intensity statistics — so A's weights fit and
   B's images are resampled and normalised as A's were in pretraining;
4. nnU-Net's preprocessing of B with ``P_A`` for ``C`` (``nnUNetv2_preprocess -d B -plans_name P_A -c C``);
5. the record ``$nnUNet_results/<B>/pgl_transfer__<P_A>__<C>.json``: ``{source_dataset: A, source_plans: P,
   configuration: C, target_dataset: B, target_plans: P_A, ...}``.

Then ``nnUNetv2_train B C FOLD -tr nnUNetTrainerPGL -p P_A`` starts from A's ``fold_all`` checkpoint
(``nnUNetTrainerPGLBYOL`` from A's BYOL one, and so on) with no environment variable; the training log says
"transferred" and names the record.

Where the record lives, and why there: in ``$nnUNet_results/<B>/``, beside the result folders, named in nnU-Net's
``<trainer>__<plans>__<configuration>`` scheme.

* ``nnUNet_results``, not ``nnUNet_preprocessed``: the results folder is what the runs of B share — the first
  training, every ``--c`` and ``--val``, and other machines that mount the same results while keeping their
  preprocessed data on local disks as nnU-Net advises (such a machine may preprocess B itself). A key added to the
  plans file would be lost whenever the plans are moved or planned again, and the ``plans.json`` copies in result
  folders are rewritten from the preprocessed plans at every start.
* names, not paths: the record holds A's dataset name and plans identifier, and the trainer resolves them against
  its own ``$nnUNet_results``, so a machine that mounts the results folder elsewhere finds the same checkpoint.
* one file for all PGL trainers, folds and label fractions of ``(B, P_A, C)``: a fine-tuning run reads it each time
  it starts fresh; nothing a run writes touches it, so ``--c`` keeps it. A pretraining of B itself with ``-p P_A``
  (``fold_K`` / ``fold_all``) takes precedence over it, and ``$nnUNet_pgl_weights`` over both.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

from nnunet_pgl.pretraining.helptext import DefaultsOnceFormatter

PROG = "pgl_transfer"


class TransferError(RuntimeError):
    """Something the user can fix; the message says what to run. Raised before anything is written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune dataset B from the PGL pretraining of dataset A: moves A's plans to B (nnU-Net's "
                    "nnUNetv2_move_plans_between_datasets), preprocesses B with them and records which PGL checkpoint "
                    "belongs to those plans, so that nnUNetv2_train B C FOLD -tr nnUNetTrainerPGL -p P_A finds it.",
        formatter_class=DefaultsOnceFormatter)
    p.add_argument("-s", dest="source", required=True, help="Dataset A (name or ID): planned, and pretrained with "
                   "pgl_pretrain (now or later).")
    p.add_argument("-t", dest="target", required=True, help="Dataset B (name or ID), in nnUNet_raw.")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="Plans identifier of A (the pretraining's -p).")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="The pretrained 3D configuration.")
    p.add_argument("-tp", dest="target_plans", default=None,
                   help="Plans identifier for B (default: <P>_<A's dataset name>); fine-tune B with -p this.")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="Processes for fingerprint extraction and preprocessing (default: nnU-Net's "
                        "default_num_processes).")
    return p


def _dataset_name(name_or_id: str, what: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(name_or_id)
    except (RuntimeError, ValueError):
        raise TransferError(f"{what} dataset {name_or_id} is in none of nnUNet_raw, nnUNet_preprocessed, "
                            "nnUNet_results: check the name or ID and the three environment variables") from None


def _channels(dataset_json: Dict[str, Any]) -> List[str]:
    ch = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    return [str(ch[k]) for k in sorted(ch, key=int)]


def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _same_source_plans(existing: Dict[str, Any], source: Dict[str, Any], configuration: str) -> bool:
    """Whether B's existing plans were moved from A's current plans (for ``configuration``: network, patch size,
    spacing, normalisation; and the intensity statistics)."""
    a = {k: v for k, v in existing.get("configurations", {}).get(configuration, {}).items() if k != "data_identifier"}
    b = {k: v for k, v in source["configurations"][configuration].items() if k != "data_identifier"}
    key = "foreground_intensity_properties_per_channel"
    return a == b and existing.get(key) == source.get(key)


def transfer(source: str, target: str, plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
             target_plans: Optional[str] = None, num_processes: Optional[int] = None) -> Dict[str, Any]:
    """Everything ``pgl_transfer`` does; returns the record (plus ``record_path``, ``checkpoints``, ``warnings``).

    Raises:
        TransferError: a problem the user can fix, before anything is written.
    """
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_pgl
    from nnunet_pgl.pretraining.atomic import atomic_write_json
    from nnunet_pgl.pretraining.contract import transfer_record_path

    for var, val in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed),
                     ("nnUNet_results", nnUNet_results)):
        if not val:
            raise TransferError(f"${var} is not set. Set nnUNet_raw, nnUNet_preprocessed and nnUNet_results as for "
                                "nnU-Net")
    a, b = _dataset_name(source, "source"), _dataset_name(target, "target")
    if a == b:
        raise TransferError(f"-s and -t are the same dataset ({a}): fine-tune it with nnUNetv2_train {a} ... -p "
                            f"{plans}, no transfer needed")
    plans_file = os.path.join(str(nnUNet_preprocessed), a, plans + ".json")
    if not os.path.isfile(plans_file):
        raise TransferError(f"{a} has no plans '{plans}' ({plans_file}). Plan it first: nnUNetv2_plan_and_preprocess "
                            f"-d {a} -c {configuration} (or pass the -p the pretraining used)")
    source_plans = _load(plans_file)
    if configuration not in source_plans.get("configurations", {}):
        raise TransferError(f"configuration '{configuration}' is not in {plans_file} (available: "
                            f"{sorted(source_plans.get('configurations', {}))})")
    pm = PlansManager(plans_file)
    if len(pm.get_configuration(configuration).patch_size) != 3:
        raise TransferError(f"configuration '{configuration}' is 2D; PGL pretrains 3D networks (use 3d_fullres)")
    raw_b = os.path.join(str(nnUNet_raw), b)
    if not os.path.isfile(os.path.join(raw_b, "dataset.json")):
        raise TransferError(f"{b} has no dataset.json in nnUNet_raw ({raw_b}): pgl_transfer preprocesses B from its "
                            "raw images, as nnUNetv2_preprocess does")
    a_json_file = next((f for f in (os.path.join(str(nnUNet_preprocessed), a, "dataset.json"),
                                    os.path.join(str(nnUNet_raw), a, "dataset.json")) if os.path.isfile(f)), None)
    if a_json_file is None:
        raise TransferError(f"{a} has no dataset.json in nnUNet_preprocessed or nnUNet_raw. Plan it first: "
                            f"nnUNetv2_plan_and_preprocess -d {a} -c {configuration}")
    a_json, b_json = _load(a_json_file), _load(os.path.join(raw_b, "dataset.json"))
    ch_a, ch_b = _channels(a_json), _channels(b_json)
    if len(ch_a) != len(ch_b):
        raise TransferError(f"{a} has {len(ch_a)} input channel(s) {ch_a} but {b} has {len(ch_b)} {ch_b}: A's "
                            "network does not take B's images")
    warnings: List[str] = []
    if [c.lower() for c in ch_a] != [c.lower() for c in ch_b]:
        warnings.append(f"channel names differ: {ch_a} in {a}, {ch_b} in {b}; B's images are normalised as A's "
                        f"({pm.get_configuration(configuration).normalization_schemes})")
    tp = target_plans or f"{plans}_{a}"
    if "__" in tp or os.sep in tp:
        raise TransferError(f"-tp {tp}: a plans identifier must not contain '__' or '{os.sep}' (nnU-Net splits "
                            "result folder names at '__')")
    target_file = os.path.join(str(nnUNet_preprocessed), b, tp + ".json")
    if os.path.isfile(target_file) and not _same_source_plans(_load(target_file), source_plans, configuration):
        raise TransferError(f"{target_file} exists and is not {a}'s current plans '{plans}' (moved from another "
                            f"dataset, or {a} was planned again since). Pass -tp with a new name, or delete it (and "
                            "the results trained with it) to replace it")
    checkpoints, ck_warnings = _source_checkpoints(a, b, plans, configuration, source_plans, a_json)
    warnings += ck_warnings

    _move_and_preprocess(a, b, plans, tp, configuration, num_processes)
    record = {"format": 1, "source_dataset": a, "source_plans": plans, "configuration": configuration,
              "target_dataset": b, "target_plans": tp,
              "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "nnunet_pgl_version": nnunet_pgl.__version__}
    record_path = transfer_record_path(b, tp, configuration)
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    atomic_write_json(record_path, record, indent=2)
    return dict(record, record_path=record_path, checkpoints=checkpoints, warnings=warnings)


def _source_checkpoints(a: str, b: str, plans: str, configuration: str, source_plans: Dict[str, Any],
                        a_json: Dict[str, Any]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """A's PGL checkpoints per pretrainer (they must fit A's plans: B's are the same), and the warnings: each
    checkpoint's preprocessing mismatches, or, when A has none, the command that makes one."""
    from nnunet_pgl.pretraining.contract import (PRETRAINER_BY_METHOD, PGLCheckpointError, check_pgl_meta,
                                                 pretrain_command, pretraining_checkpoint, read_pgl_checkpoint)
    warnings: List[str] = []
    checkpoints: Dict[str, Optional[str]] = {}
    for pretrainer in PRETRAINER_BY_METHOD.values():  # A's checkpoints must fit A's plans: B's are the same
        path = pretraining_checkpoint(a, plans, configuration, pretrainer, "all")
        if os.path.isfile(path):
            try:
                warnings += check_pgl_meta(read_pgl_checkpoint(path), path, source_plans, configuration, a_json,
                                           pretrainer)
            except PGLCheckpointError as e:
                raise TransferError(f"{a}'s pretraining does not fit its own plans any more: {e}") from None
            checkpoints[pretrainer] = path
    if not checkpoints:
        pretrainer = PRETRAINER_BY_METHOD["pgl"]
        checkpoints[pretrainer] = None
        warnings.append(f"{a} has no PGL pretraining for plans {plans}, configuration {configuration} yet "
                        f"({pretraining_checkpoint(a, plans, configuration, pretrainer, 'all')}): run "
                        f"{pretrain_command(a, configuration, plans, pretrainer)} before fine-tuning {b}")
    return checkpoints, warnings


def _move_and_preprocess(a: str, b: str, plans: str, tp: str, configuration: str, num_processes: Optional[int]) -> None:
    """B's fingerprint (if missing) and dataset.json, A's plans moved to B as ``tp``, B preprocessed with them."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    raw_b = os.path.join(str(nnUNet_raw), b)
    n = num_processes or default_num_processes
    b_id = int(b[len("Dataset"):len("Dataset") + 3])
    if not os.path.isfile(os.path.join(str(nnUNet_preprocessed), b, "dataset_fingerprint.json")):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints
        print(f"{PROG}: extracting the fingerprint of {b} (nnUNetv2_extract_fingerprint -d {b_id})", flush=True)
        extract_fingerprints([b_id], num_processes=n, check_dataset_integrity=True, verbose=False)
    # nnU-Net's planner puts dataset.json beside the plans (preprocessing reads it there); no planning ran for B
    shutil.copy(os.path.join(raw_b, "dataset.json"), os.path.join(str(nnUNet_preprocessed), b, "dataset.json"))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    print(f"{PROG}: {a}'s plans {plans} -> {b} as {tp} (nnUNetv2_move_plans_between_datasets -s {a} -t {b} -sp "
          f"{plans} -tp {tp})", flush=True)
    move_plans_between_datasets(a, b, plans, tp)
    print(f"{PROG}: preprocessing {b} with {tp} (nnUNetv2_preprocess -d {b_id} -plans_name {tp} -c "
          f"{configuration})", flush=True)
    preprocess_dataset(b_id, tp, [configuration], [n], verbose=False)


def _fail(msg: str) -> NoReturn:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        r = transfer(args.source, args.target, args.plans, args.configuration, args.target_plans, args.num_processes)
    except TransferError as e:
        _fail(str(e))
    for w in r["warnings"]:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print(f"{PROG}: {r['target_dataset']} has {r['source_dataset']}'s plans as {r['target_plans']}, preprocessed for "
          f"{r['configuration']}; record {r['record_path']}")
    for pretrainer, path in r["checkpoints"].items():
        print(f"  {pretrainer}: {path or 'not pretrained yet'}")
    print(f"Fine-tune: nnUNetv2_train {r['target_dataset']} {r['configuration']} FOLD -tr nnUNetTrainerPGL -p "
          f"{r['target_plans']}")


if __name__ == "__main__":
    main()
