"""``nnUNetPretrainerPGL``: PGL pretraining of the exact network the plans build, as an ``nnUNetTrainer``.

Driven by nnU-Net's own ``run_training`` (fold ``'all'``), so output folder, log file, plans/dataset copies, ``--c``
and DDP (``-num_gpus``) work as for any trainer. What changes, hook by hook:

* ``initialize``: build the network with nnU-Net's ``build_network_architecture``, wrap it in the online
  :class:`~nnunet_pgl.PGLBranch` (features at the loss levels → alignment → heads), freeze what the loss never
  reaches (segmentation layers, decoder stages above the finest level: no unused parameters under DDP), make the
  EMA target (outside DDP), compile per nnU-Net's ``nnUNet_compile`` rule, DDP-wrap the online branch.
* ``get_dataloaders``: the region loader (:mod:`nnunet_pgl.pretraining.loader`) over labeled and unlabeled cases.
* ``train_step``: views + priors + intensity augmentation on the device, online fwd+bwd of both views as one batch,
  target fwd, loss, clipping, EMA, per-iteration LR/τ schedules (:func:`scheduled_lr_tau`; a ``--c`` that changes
  the run's length joins them by a re-warm-up), non-finite steps skipped and counted.
* epoch hooks, checkpoints and logging: own per-epoch log (``pgl_log.json``, ``progress.png``), the epoch's loss
  sums made on the training device and copied to the host once; checkpoints hold host tensors only: the full U-Net
  ``network_weights`` (no prefixes) that stock ``-pretrained_weights`` loads, plus ``pgl_meta`` and the state
  ``--c`` needs (``load_checkpoint`` puts it back on the device).
* no validation (``perform_actual_validation`` only logs).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from nnunet_pgl import (IntensityAugmentation, PGLBranch, ViewPrior, default_levels, ema_update_, level_strides,
                        make_target, make_view_pair, pgl_loss, unwrap_network)
from nnunet_pgl.collapse import CollapseMonitor
from nnunet_pgl.evaluation.probe import ProbeSet
from nnunet_pgl.pretraining.atomic import FIGURE_TMP_SUFFIX, TMP_SUFFIX, atomic_write_json
from nnunet_pgl.pretraining.cases import PretrainCase, select_cases
from nnunet_pgl.pretraining.checkpointing import CheckpointHooks
from nnunet_pgl.pretraining.config import CONFIG_FILE, config_from_env
from nnunet_pgl.pretraining.contract import FINAL_CHECKPOINT, file_hash
from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader, region_size_for
from nnunet_pgl.pretraining.lock import RunLock
from nnunet_pgl.pretraining.monitor import MonitorHooks
from nnunet_pgl.pretraining.schedule import scheduled_lr_tau
from nnunet_pgl.views import pair_overlap

#: the pretrainer classes (the shim nnU-Net searches imports these)
__all__ = ["nnUNetPretrainerPGL", "nnUNetPretrainerBYOL", "nnUNetPretrainerPGLBYOL"]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps."""


class nnUNetPretrainerPGL(CheckpointHooks, MonitorHooks, nnUNetTrainer):
    """PGL pretraining (local consistency). Configure with ``pgl_pretrain`` (see :mod:`.config`)."""

    method = "pgl"
    # set by initialize(): the online branch, its EMA target, and what train_step calls (compiled, DDP-wrapped)
    online: PGLBranch
    target: PGLBranch
    model: torch.nn.Module
    target_model: torch.nn.Module
    was_initialized: bool  # nnU-Net's flag, declared here as its trainer has no type information

    def __init__(self, plans: dict, configuration: str, fold: Union[int, str], dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:  # nnU-Net assumes one node and CUDA under DDP; allow torchrun on several nodes and CPU/gloo
            if device.type == "cpu":
                self.device, self.grad_scaler = torch.device("cpu"), None
            elif device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", str(self.local_rank))))
        cfg = config_from_env()
        cfg.method = self.method
        cfg.schedule_extension = None  # run state: load_checkpoint restores it on --c; a fresh run has none
        if fold != "all":  # fold_K is the pretraining for fold K: it leaves out fold K's validation cases
            if cfg.exclude_fold is None:
                cfg.exclude_fold = int(fold)
            elif cfg.exclude_fold != int(fold):
                raise ValueError(f"the pretraining configuration excludes fold {cfg.exclude_fold} but the run writes "
                                 f"fold_{fold}: run pgl_pretrain --exclude-fold {fold} (or --folds), which keeps them "
                                 "equal")
        self.pgl_config = cfg
        self.num_epochs = cfg.epochs
        self.num_iterations_per_epoch = cfg.iters_per_epoch
        self.num_val_iterations_per_epoch = 0
        self.initial_lr = cfg.initial_lr
        self.weight_decay = cfg.weight_decay
        self.save_every = cfg.save_every
        self.enable_deep_supervision = False
        self.augment = IntensityAugmentation() if cfg.intensity_aug else None
        self.pgl_log: List[Dict[str, Any]] = []
        self._epoch_stats: Dict[str, Any] = {}
        self.bad_steps_total = 0
        self._last_checkpoint: Optional[Tuple[str, int]] = None  # (path, epoch) of the newest checkpoint on disk
        self._bad_streak = 0
        self.view_generator: Optional[torch.Generator] = None
        self.pretrain_cases: List[PretrainCase] = []
        # dense linear probe (rank 0) and collapse/shortcut statistics (rank 0), see _probe_and_collapse
        self._probe_set: Optional[ProbeSet] = None
        self._probe_init: Optional[Dict[str, Any]] = None
        self._collapse = CollapseMonitor() if cfg.collapse_every > 0 and self.local_rank == 0 else None

    # ------------------------------------------------------------------------------------------- set-up
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        cfg = self.pgl_config
        self._set_batch_size_and_oversample()
        if cfg.batch_size is not None:
            world = dist.get_world_size() if self.is_ddp else 1
            if cfg.batch_size < world:
                raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the number of GPUs ({world})")
            self.batch_size = cfg.batch_size // world + (1 if self.local_rank < cfg.batch_size % world else 0)
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        torch.manual_seed(cfg.seed)  # same initial weights and heads for the same --seed (resume determinism)
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                              self.num_input_channels, self.label_manager.num_segmentation_heads,
                                              self.enable_deep_supervision).to(self.device)
        strides = level_strides(net)
        levels = cfg.levels if cfg.levels is not None else default_levels(strides)
        self.online = PGLBranch(net, levels, self.method, cfg.proj_dim, cfg.hidden_dim).to(self.device)
        # the loss levels, as asked (features.levels adds the bottleneck of the global term: saved, a --c would
        # build a projector for it)
        cfg.levels = list(self.online.loss_levels if self.online.use_local else levels)
        for m in self.online.features.unused_modules():
            m.requires_grad_(False)
        self.target = make_target(self.online)
        self.network = net  # nnU-Net's hooks (deep supervision flag, plotting) see the plain U-Net
        self.model = self.online
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            # torch.compile of a Module returns a Module (OptimizedModule); its stub says a plain callable
            self.model = torch.compile(self.online)  # type: ignore[assignment]
            self.target_model = torch.compile(self.target)  # type: ignore[assignment]
        else:
            self.target_model = self.target
        if self.is_ddp:
            kw: Dict[str, Any] = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = DDP(self.model, **kw)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss = None
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.view_generator = torch.Generator(device=self.device)  # re-seeded every step in train_step
        self.was_initialized = True
        self.logger.update_config({"pgl": cfg.to_json()})

    def configure_optimizers(self):
        params = [p for p in self.online.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay,
                              momentum=self.pgl_config.momentum, nesterov=True)
        return opt, None  # the LR follows warmup_cosine_lr per iteration (train_step)

    def set_deep_supervision_enabled(self, enabled: bool):
        decoder: Any = unwrap_network(self.network).decoder  # dynamic_network_architectures' (untyped) decoder
        decoder.deep_supervision = enabled

    def _case_lists(self) -> List[PretrainCase]:
        """Pretraining cases (:func:`~nnunet_pgl.pretraining.cases.select_cases`): labeled images minus fold K's
        validation cases, and the ingested unlabeled cases."""
        cfg = self.pgl_config
        ids = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)) \
            if cfg.use_labeled_images else []
        val = self._excluded_validation_cases(ids) if ids and cfg.exclude_fold is not None else set()
        hashes = self._labeled_hashes([i for i in ids if i not in val])
        return select_cases(ids, val, self.preprocessed_dataset_folder, hashes, cfg.unlabeled_cases)

    def _excluded_validation_cases(self, ids: List[str]) -> set:
        """Fold ``--exclude-fold``'s validation cases in ``splits_final.json`` (made as nnU-Net does if missing)."""
        k = self.pgl_config.exclude_fold
        assert k is not None, "called only with --exclude-fold"
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if not isfile(splits_file):
            self.print_to_log_file("Creating new 5-fold cross-validation split...")
            if self.local_rank == 0:
                save_json(generate_crossval_split(ids, seed=12345, n_splits=5), splits_file)
            if self.is_ddp:
                dist.barrier()
        splits = load_json(splits_file)
        if not 0 <= k < len(splits):
            raise ValueError(f"--exclude-fold {k}: {splits_file} has folds 0-{len(splits) - 1}")
        val = set(splits[k]["val"])
        self.print_to_log_file(f"--exclude-fold {k}: leaving out {len(val)} validation cases")
        return val

    def _labeled_hashes(self, ids: List[str]) -> Dict[str, str]:
        """sha256 of each labeled case's preprocessed image (cached by size/mtime beside the output)."""
        cache_file = join(self.output_folder, "case_hashes.json")
        cache = load_json(cache_file) if isfile(cache_file) else {}
        out = {i: file_hash(join(self.preprocessed_dataset_folder, i + ".b2nd"), cache) for i in ids}
        if self.local_rank == 0:
            atomic_write_json(cache_file, cache)
        return out

    def get_dataloaders(self):
        cfg = self.pgl_config
        self.pretrain_cases = self._case_lists()
        n_lab = sum(c.kind == "labeled" for c in self.pretrain_cases)
        self.print_to_log_file(f"Pretraining cases: {n_lab} labeled images, {len(self.pretrain_cases) - n_lab} "
                               "unlabeled")
        region = region_size_for(self.configuration_manager.patch_size, cfg.scale_range[1])
        workers = cfg.num_workers if cfg.num_workers is not None else min(4, get_allowed_n_proc_DA())
        ds = RegionDataset([c.data_file for c in self.pretrain_cases], region, self.batch_size,
                           cfg.seed + 7919 * self.local_rank, start_batch=self.current_epoch * self.num_iterations_per_epoch,
                           patch_size=self.configuration_manager.patch_size, scale_range=tuple(cfg.scale_range),
                           min_overlap=cfg.min_overlap)
        loader = TimedLoader(ds, workers, pin_memory=self.device.type == "cuda")
        self.print_to_log_file(f"Region loader: 2 regions {region} per pair (offset drawn for overlaps down to "
                               f"{cfg.min_overlap:g}), batch {self.batch_size} pairs, {workers} workers")
        return loader, None

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        maybe_mkdir_p(self.output_folder)
        if self.local_rank == 0:
            self._lock = RunLock(self.output_folder).acquire()  # pgl_pretrain took it already; same pid: re-taken
            self._remove_partial_writes()
            self.pgl_config.save(join(self.output_folder, CONFIG_FILE))
        super().on_train_start()
        self._probe_start()

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of a killed run (a checkpoint or plot killed mid-write). Only the lock holder
        writes here, so every ``*.tmp`` / ``*.tmp.png`` is a leftover; the complete files are untouched."""
        for folder in (self.output_folder, join(self.output_folder, "pictures")):
            if os.path.isdir(folder):
                for n in os.listdir(folder):
                    if n.endswith((TMP_SUFFIX, FIGURE_TMP_SUFFIX)):
                        os.remove(join(folder, n))
                        self.print_to_log_file(f"Removed {n}, a partial write of an interrupted run")

    def plot_network_architecture(self):
        pass  # nnU-Net's plot needs hiddenlayer and the segmentation forward; nothing to add for pretraining

    # ------------------------------------------------------------------------------------------- training
    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def on_epoch_start(self):
        self._epoch_stats = {"t0": time.time(), "losses": [], "levels": [], "global": [], "bad": 0}
        if self.dataloader_train is not None:
            self.dataloader_train.pop_wait()
        super().on_epoch_start()

    def on_train_epoch_start(self):
        self.online.train()
        self.target.train()
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self._iter = 0
        self._show_progress = self.local_rank == 0 and sys.stdout.isatty()

    def train_step(self, batch: dict) -> dict:
        """One pretraining step: schedules, views, forward, loss, optimizer, EMA (a non-finite loss skips the step
        on every rank)."""
        step = self.current_epoch * self.num_iterations_per_epoch + self._iter
        tau = self._apply_schedules(step)
        x, pa, pb = self._make_views(batch, step)
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        with amp:
            out = self.model(x, pa, pb)
            with torch.no_grad():
                tgt = self.target_model(x, pa, pb, use_predictor=False)
            loss, per_level, glob = pgl_loss(out, tgt, self.pgl_config.global_weight)
        if not self._all_finite(loss):
            self._skip_bad_step(float(loss.detach().float().cpu()))
            return {}
        self._bad_streak = 0
        self._optimizer_step(loss)
        ema_update_(self.target, self.online, tau)
        self._record_step(loss, per_level, glob, tgt, pa, pb)
        return {}

    def _apply_schedules(self, step: int) -> float:
        """Set the learning rate of global step ``step`` (:func:`scheduled_lr_tau`); return its EMA τ."""
        lr, tau = scheduled_lr_tau(self.pgl_config, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._epoch_stats["lr"], self._epoch_stats["tau"] = lr, tau
        return tau

    def _make_views(self, batch: dict, step: int) -> Tuple[torch.Tensor, ViewPrior, ViewPrior]:
        """The two views of each pair as one batch ``(2B, C, *patch)`` (intensity-augmented) and their priors."""
        cfg = self.pgl_config
        # per-step seed: views and intensity draws of step k are the same in a resumed and an uninterrupted run
        assert self.view_generator is not None, "made by initialize()"
        self.view_generator.manual_seed(hash((cfg.seed, self.local_rank, step)) & 0xFFFF_FFFF_FFFF)
        # a pair's two regions (B, 2, C, *R); the offsets (B, 2, 3) stay on the host, where make_view_pair checks
        # them without a device synchronisation, and then move them itself
        regions = batch["data"].to(self.device, non_blocking=True)
        offset = batch["offset"]
        with torch.no_grad():
            va, vb, pa, pb = make_view_pair(regions[:, 0], self.configuration_manager.patch_size,
                                            scale_range=(cfg.scale_range[0], cfg.scale_range[1]),
                                            min_overlap=cfg.min_overlap,
                                            flip_prob=cfg.flip_prob, generator=self.view_generator,
                                            region_offset=offset[:, 0], region_b=regions[:, 1],
                                            region_offset_b=offset[:, 1])
            self._epoch_stats.setdefault("overlap", []).append(pair_overlap(pa, pb))
            x = torch.cat([va, vb])
            if self.augment is not None:
                x = self.augment(x, generator=self.view_generator)
        return x, pa, pb

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one flag reduced with MAX under DDP)."""
        bad = torch.logical_not(torch.isfinite(loss.detach())).float()
        if self.is_ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward (scaled under AMP), gradient clipping, optimizer step."""
        params = [p for p in self.online.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.pgl_config.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.pgl_config.grad_clip)
            self.optimizer.step()

    def _record_step(self, loss: torch.Tensor, per_level: List[torch.Tensor], glob: Optional[torch.Tensor],
                     tgt: Any, pa: ViewPrior, pb: ViewPrior) -> None:
        """Keep the step's losses (on the device) for the epoch end; collapse statistics when due; progress."""
        self._epoch_stats["losses"].append(loss.detach())
        self._epoch_stats["levels"].append(torch.stack([lv.detach() for lv in per_level]) if per_level else None)
        if glob is not None:
            self._epoch_stats["global"].append(glob.detach())
        if self._collapse is not None and self._iter % self.pgl_config.collapse_every == 0:
            self._collapse.update(tgt, self.online.loss_levels, pa, pb, self.online.geometry)
        self._iter += 1
        if self._show_progress:
            print(f"\r  iteration {self._iter}/{self.num_iterations_per_epoch}  loss {float(loss):.4f}",
                  end="", flush=True)

    def _skip_bad_step(self, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps_total += 1
        self._bad_streak += 1
        self._epoch_stats["bad"] += 1
        self._iter += 1
        self.print_to_log_file(f"WARNING: non-finite loss ({value}) at epoch {self.current_epoch}, iteration "
                               f"{self._iter - 1}: step skipped ({self._bad_streak} in a row)")
        if self._bad_streak >= self.pgl_config.max_bad_steps:
            if self._last_checkpoint is not None:
                path, epoch = self._last_checkpoint
                kept = (f"its last checkpoint, {path} (epoch {epoch}), is kept: lower the learning rate (--lr) or "
                        f"check the data for NaN/Inf, and resume from it with --c")
            else:
                kept = (f"no checkpoint was written yet (the first comes after {self.save_every} epochs): lower the "
                        f"learning rate (--lr) or check the data for NaN/Inf, and rerun without --c")
            msg = (f"{self._bad_streak} consecutive non-finite losses, the last at epoch {self.current_epoch}, "
                   f"iteration {self._iter - 1}. The run stopped; {kept}")
            self.print_to_log_file(f"ERROR: {msg}")
            raise NonFiniteLossError(msg)

    def on_validation_epoch_start(self):
        pass

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        pass

    def on_train_end(self):
        super().on_train_end()
        if self.dataloader_train is not None:
            self.dataloader_train.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining has no validation. Fine-tune with: nnUNetv2_train "
                               f"{self.plans_manager.dataset_name} {self.configuration_name} FOLD -pretrained_weights "
                               f"{join(self.output_folder, FINAL_CHECKPOINT)}")

class nnUNetPretrainerBYOL(nnUNetPretrainerPGL):
    """The global-consistency baseline (BYOL on the pooled bottleneck), same network, data and schedule."""

    method = "byol"


class nnUNetPretrainerPGLBYOL(nnUNetPretrainerPGL):
    """Local (PGL) plus global (BYOL) consistency."""

    method = "pgl+byol"
