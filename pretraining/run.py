"""The Python API behind ``pgl_pretrain``: :func:`pretrain` (one run) and :func:`pretrain_folds` (one per fold).

Layered the way nnU-Net layers ``run_training``: the CLI parses arguments and calls these; they check the dataset and
plans, resolve the configuration (:class:`~nnunet_pgl.pretraining.config.PretrainConfig`, from the run's own
``pgl_config.json`` on ``--c``), take the output folder's lock, ingest the unlabeled folders, write the configuration
and hand over to nnU-Net's ``run_training`` (or one ``torchrun`` rank). Problems the user can fix raise
:class:`PretrainError` before anything is written; a run stopped by non-finite losses raises
:class:`~nnunet_pgl.pretraining.pretrainer.NonFiniteLossError`, a ``--c`` its checkpoint cannot continue
:class:`~nnunet_pgl.pretraining.checkpointing.ResumeError`.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json

from nnunet_pgl.pretraining.config import CONFIG_ENV, CONFIG_FILE, PretrainConfig
from nnunet_pgl.pretraining.contract import FINAL_CHECKPOINT, PRETRAINER_BY_METHOD, pretraining_folder

if TYPE_CHECKING:
    import torch

PLANNED_HINT = "nnUNetv2_plan_and_preprocess -d {d} -c {c}"


class PretrainError(ValueError):
    """A problem the user can fix (the message says how); raised before the run writes anything."""


@dataclass
class PlannedDataset:
    """A dataset planned and preprocessed by nnU-Net, with the plans and configuration a pretraining uses."""

    name: str
    base: str                   # $nnUNet_preprocessed/<name>
    plans_manager: Any          # nnU-Net's PlansManager
    configuration_manager: Any  # nnU-Net's ConfigurationManager of the configuration
    dataset_json: Dict[str, Any]


def planned_dataset(dataset: Union[str, int], plans: str, configuration: str,
                    need_results: bool = True) -> PlannedDataset:
    """Check that ``dataset`` is planned with ``plans`` for the 3D ``configuration`` and preprocessed (and, with
    ``need_results``, that ``$nnUNet_results`` is set: readers such as ``pgl_probe`` write nothing there)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    needed = (("nnUNet_preprocessed", nnUNet_preprocessed),) + ((("nnUNet_results", nnUNet_results),)
                                                              if need_results else ())
    for var, val in needed:
        if not val:
            raise PretrainError(f"${var} is not set. Set nnUNet_raw, nnUNet_preprocessed and nnUNet_results as for "
                                "nnU-Net")
    hint = PLANNED_HINT.format(d=dataset, c=configuration)
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise PretrainError(f"dataset {dataset} is not in $nnUNet_preprocessed ({nnUNet_preprocessed}). Plan and "
                            f"preprocess it first: {hint}") from None
    base = join(str(nnUNet_preprocessed), name)
    plans_file = join(base, plans + ".json")
    if not isfile(plans_file):
        not_plans = ("dataset.json", "dataset_fingerprint.json", "splits_final.json")
        have = sorted(f[:-5] for f in os.listdir(base) if f.endswith(".json") and f not in not_plans) \
            if isdir(base) else []
        raise PretrainError(f"no plans '{plans}' for {name} (found: {have or 'none'}). Plan first: {hint}, or pass -p "
                            "with one of those")
    plans_dict = load_json(plans_file)
    if configuration not in plans_dict["configurations"]:
        raise PretrainError(f"configuration '{configuration}' is not in plans {plans} (available: "
                            f"{sorted(plans_dict['configurations'])})")
    pm = PlansManager(plans_dict)
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise PretrainError(f"configuration '{configuration}' is 2D; PGL pretrains and probes 3D networks (use "
                            "3d_fullres)")
    data_dir = join(base, cm.data_identifier)
    if not isdir(data_dir) or not any(f.endswith((".b2nd", ".npz", ".npy")) for f in os.listdir(data_dir)):
        raise PretrainError(f"{data_dir} holds no preprocessed cases. Preprocess: nnUNetv2_preprocess -d {dataset} "
                            f"-c {configuration} -plans_name {plans}")
    return PlannedDataset(name, base, pm, cm, load_json(join(base, "dataset.json")))


def check_fold(base: str, exclude_fold: Optional[int]) -> None:
    """``--exclude-fold K`` must name a fold of ``splits_final.json`` (nnU-Net's 5 folds if it does not exist yet)."""
    if exclude_fold is None:
        return
    splits_file = join(base, "splits_final.json")
    n_splits = len(load_json(splits_file)) if isfile(splits_file) else 5
    if not 0 <= exclude_fold < n_splits:
        raise PretrainError(f"--exclude-fold {exclude_fold}: the dataset has folds 0-{n_splits - 1}"
                            + (f" ({splits_file})" if isfile(splits_file) else " (nnU-Net's 5-fold split)"))


def resolve_config(out: str, continue_training: bool, method: str, settings: Dict[str, Any],
                   unlabeled: Sequence[str], use_labeled_images: bool, probe: bool) -> PretrainConfig:
    """This run's configuration: the run's own ``pgl_config.json`` on ``--c`` (else the defaults), with every
    setting that is not None applied on top.

    Args:
        settings: :class:`PretrainConfig` field → value (None: keep).
    """
    cfg_file = join(out, CONFIG_FILE)
    cfg = PretrainConfig.load(cfg_file) if continue_training and isfile(cfg_file) else PretrainConfig()
    cfg.method = method
    for name, val in settings.items():
        if val is not None:
            setattr(cfg, name, val)
    if not probe:
        cfg.probe = False
    if cfg.probe and cfg.probe_cases < 2:
        raise PretrainError(f"--probe-cases {cfg.probe_cases}: the probe needs at least 2 cases (one to fit, one to "
                            "score); use --no-probe to turn it off")
    if not use_labeled_images:
        cfg.use_labeled_images = False
    if unlabeled:
        cfg.unlabeled_dirs = [os.path.abspath(d) for d in unlabeled]
    if not cfg.use_labeled_images and not cfg.unlabeled_dirs:
        raise PretrainError("--no-labeled-images leaves nothing to pretrain on: add --unlabeled DIR")
    return cfg


def torch_device(name: str) -> "torch.device":
    """The training device; on CPU the threads are this process's share of the cores it may use."""
    import torch
    if name == "cpu":  # the cores this process may use, shared evenly by the ranks on this node (assumes they
        # share one affinity mask, as torchrun / mp.spawn start them)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PretrainError("-device cuda but no CUDA GPU is visible. Use -device cpu (slow) or check "
                                "CUDA_VISIBLE_DEVICES")
        torch.set_num_threads(1)
        return torch.device("cuda")
    return torch.device("mps")


def under_torchrun() -> bool:
    """Any torchrun launch (it sets TORCHELASTIC_RUN_ID), one process too: that runs the DDP code with one rank, the
    way ``benchmarks/gpu_check.sh`` tests it on a single GPU; nnU-Net's own ``-num_gpus 1`` has no DDP."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and (
        int(os.environ["WORLD_SIZE"]) > 1 or "TORCHELASTIC_RUN_ID" in os.environ)


def pretrain(dataset: Union[str, int], configuration: str = "3d_fullres", plans: str = "nnUNetPlans", *,
             method: str = "pgl", unlabeled: Sequence[str] = (), use_labeled_images: bool = True,
             exclude_fold: Optional[int] = None, continue_training: bool = False, device: str = "cuda",
             num_gpus: int = 1, num_processes: Optional[int] = None, probe: bool = True,
             epochs: Optional[int] = None, iters_per_epoch: Optional[int] = None, batch_size: Optional[int] = None,
             levels: Optional[List[int]] = None, lr: Optional[float] = None, num_workers: Optional[int] = None,
             seed: Optional[int] = None, save_every: Optional[int] = None,
             probe_cases: Optional[int] = None) -> str:
    """One pretraining run (``pgl_pretrain`` without ``--folds``): ``fold_all``, or ``fold_K`` with
    ``exclude_fold=K``. The arguments are ``pgl_pretrain``'s flags (None: the run's saved value on ``--c``, else the
    default of :class:`PretrainConfig`). Returns the output folder."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    ds = planned_dataset(dataset, plans, configuration)
    check_fold(ds.base, exclude_fold)
    trainer = PRETRAINER_BY_METHOD[method]
    fold: Union[int, str] = "all" if exclude_fold is None else exclude_fold  # fold_K: the pretraining for fold K
    out = pretraining_folder(ds.name, trainer, plans, configuration, fold)
    settings = {"epochs": epochs, "iters_per_epoch": iters_per_epoch, "batch_size": batch_size, "levels": levels,
                "initial_lr": lr, "num_workers": num_workers, "seed": seed, "exclude_fold": exclude_fold,
                "save_every": save_every, "probe_cases": probe_cases}
    cfg = resolve_config(out, continue_training, method, settings, unlabeled, use_labeled_images, probe)
    dev = torch_device(device)  # fails (e.g. no CUDA) before anything is written
    job = _TrainingJob(ds.name, configuration, trainer, plans, continue_training, dev, fold, num_gpus)
    torchrun = under_torchrun()
    if torchrun:  # rank 0 ingests and writes the configuration, the others wait and read it
        import torch.distributed as dist
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://")
        if dist.get_rank() != 0:
            dist.barrier()
            os.environ[CONFIG_ENV] = join(out, CONFIG_FILE)
            job.run(torchrun=True)
            return out
    from nnunet_pgl.pretraining.lock import OutputFolder
    with OutputFolder(out) as folder:  # the lock comes first: a refused run has touched nothing
        if cfg.unlabeled_dirs:
            cfg.unlabeled_cases = _ingest(cfg.unlabeled_dirs, ds, num_processes, out)
        folder.keep()
        cfg_path = join(out, CONFIG_FILE)
        cfg.save(cfg_path)
        os.environ[CONFIG_ENV] = cfg_path
        print(f"PGL pretraining {ds.name} {configuration} {plans}: method {method}, {cfg.epochs} epochs x "
              f"{cfg.iters_per_epoch} iterations; output {out}")
        if torchrun:
            import torch.distributed as dist
            dist.barrier()
        job.run(torchrun=torchrun)
    return out


def _ingest(dirs: Sequence[str], ds: PlannedDataset, num_processes: Optional[int], out: str) -> List[Dict[str, Any]]:
    """Preprocess (or find cached) the unlabeled folders; the entries of ``pgl_config.unlabeled_cases``."""
    from nnunetv2.configuration import default_num_processes

    from nnunet_pgl.pretraining.ingest import ingest_unlabeled
    try:
        cases = ingest_unlabeled(dirs, ds.plans_manager, ds.configuration_manager, ds.dataset_json, ds.base,
                                 num_processes=num_processes or default_num_processes, report_dir=out)
    except ValueError as e:
        raise PretrainError(str(e)) from None
    print(f"Unlabeled: {len(cases)} cases ready from {len(dirs)} folder(s)")
    return [{"case_id": c.case_id, "data_file": c.data_file, "sha256": c.sha256, "source": list(c.source)}
            for c in cases]


@dataclass
class _TrainingJob:
    """nnU-Net's training of the pretrainer: ``run_training`` (``-num_gpus``), or one rank of a torchrun launch."""

    dataset_name: str
    configuration: str
    trainer: str
    plans: str
    continue_training: bool
    device: "torch.device"
    fold: Union[int, str]
    num_gpus: int

    def run(self, torchrun: bool) -> None:
        if torchrun:
            run_torchrun(self.dataset_name, self.configuration, self.trainer, self.plans, self.continue_training,
                         self.device, self.fold)
            return
        from nnunetv2.run.run_training import run_training
        run_training(self.dataset_name, self.configuration, self.fold, self.trainer, self.plans, None,
                     self.num_gpus, continue_training=self.continue_training, device=self.device)


def run_torchrun(dataset_name: str, configuration: str, trainer: str, plans: str, continue_training: bool,
                 device: "torch.device", fold: Union[int, str] = "all") -> None:
    """One rank of a ``torchrun`` launch (several nodes possible; process group already up), nnU-Net's own steps."""
    import torch
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        t = get_trainer_from_args(dataset_name, configuration, fold, trainer, plans, continue_training,
                                  device=device)
        maybe_load_checkpoint(t, continue_training, False, None)
        t.run_training()
        t.perform_actual_validation(False)
    finally:
        dist.destroy_process_group()


def fold_state(dataset: Union[str, int], method: str, plans: str, configuration: str, fold: int,
               epochs: Optional[int]) -> Tuple[str, Optional[str]]:
    """What ``--folds`` does with fold ``fold`` — ``'finished'``, ``'extend'`` (finished, and ``epochs`` asks for
    more), ``'resume'`` (has a checkpoint) or ``'start'`` — and the fold's output folder (None when
    ``$nnUNet_results`` or the dataset is unknown: the run itself then says what to do)."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_results:
        return "start", None
    try:
        out = pretraining_folder(maybe_convert_to_dataset_name(dataset), PRETRAINER_BY_METHOD[method], plans,
                                 configuration, fold)
    except RuntimeError:
        return "start", None
    if isfile(join(out, FINAL_CHECKPOINT)):
        prev = PretrainConfig.load(join(out, CONFIG_FILE)) if isfile(join(out, CONFIG_FILE)) else None
        return ("extend" if epochs is not None and prev is not None and epochs > prev.epochs else "finished"), out
    return ("resume" if isfile(join(out, "checkpoint_latest.pth")) else "start"), out


def pretrain_folds(dataset: Union[str, int], folds: Sequence[int], configuration: str = "3d_fullres",
                   plans: str = "nnUNetPlans", **kwargs: Any) -> List[int]:
    """``--folds``: one ``exclude_fold=K`` run of :func:`pretrain` per fold, in order; finished folds skipped,
    interrupted ones resumed. A fold is finished when its ``checkpoint_final.pth`` exists and ``epochs`` (if given)
    does not ask for more epochs than its ``pgl_config.json`` has; it is resumed (``--c``) when it has a
    checkpoint, else started. ``kwargs`` are :func:`pretrain`'s. Returns the folds done."""
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PretrainError("--folds does not run under torchrun: launch one torchrun per fold, e.g. for K in 0 1 2 3 "
                            "4; do torchrun ... pgl_pretrain ... --exclude-fold K; done (add --c to resume one)")
    if kwargs.get("exclude_fold") is not None:
        raise PretrainError("--folds and --exclude-fold exclude each other: --folds 0 1 2 3 4 runs --exclude-fold K "
                            "for each K")
    todo = list(dict.fromkeys(folds))
    if any(k < 0 for k in todo):
        raise PretrainError(f"--folds {' '.join(map(str, folds))}: folds are numbered from 0 (splits_final.json)")
    kwargs.pop("exclude_fold", None)
    asked_c = bool(kwargs.pop("continue_training", False))
    done: List[int] = []
    for i, k in enumerate(todo):
        state, out = fold_state(dataset, kwargs.get("method", "pgl"), plans, configuration, k, kwargs.get("epochs"))
        tag = f"pgl_pretrain --folds: fold {k} ({i + 1}/{len(todo)})"
        if state == "finished":
            print(f"{tag}: finished ({join(str(out), FINAL_CHECKPOINT)}), skipped", flush=True)
        else:
            what = {"start": "starting", "resume": "resuming from checkpoint_latest.pth",
                    "extend": f"extending to {kwargs.get('epochs')} epochs"}[state]
            print(f"{tag}: {what}", flush=True)
            pretrain(dataset, configuration, plans, exclude_fold=k,
                     continue_training=asked_c or state in ("resume", "extend"), **kwargs)
        done.append(k)
    print(f"pgl_pretrain --folds: folds {' '.join(map(str, done))} done; nnUNetTrainerPGL uses fold_K for fold K",
          flush=True)
    return done
