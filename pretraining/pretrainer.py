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
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
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

from nnunet_pgl import (IntensityAugmentation, PGLBranch, default_levels, ema_update_, level_strides,
                        make_target, make_view_pair, pgl_loss, rewarm, rewarm_steps, tau_schedule, unwrap_network,
                        warmup_cosine_lr)
from nnunet_pgl.pretraining.config import CONFIG_FILE, PretrainConfig, config_from_env
from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader, region_size_for
from nnunet_pgl.views import pair_overlap
from nnunet_pgl.pretraining.lock import RunLock
from nnunet_pgl.pretraining.contract import build_meta, file_hash
from nnunet_pgl.collapse import CollapseMonitor, LevelStats, collapse_warnings
from nnunet_pgl.evaluation.probe import ProbeSet, ProbeUnavailable, build_probe_set, format_scores, probe_network


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps."""


class ResumeError(ValueError):
    """``--c`` asked for a run that the checkpoint cannot continue (the message says what to pass instead)."""


def _to_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts/lists/tuples of tensors and builtins) with every tensor a compact host copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def scheduled_lr_tau(cfg: PretrainConfig, step: int) -> Tuple[float, float]:
    """Learning rate and EMA τ of global step ``step`` (0-based, ``epoch · iters_per_epoch + iteration``).

    The run's schedules: linear warm-up over ``warmup_epochs`` then cosine to 0 at ``epochs · iters_per_epoch``
    (:func:`~nnunet_pgl.warmup_cosine_lr`), τ cosine from ``base_tau`` to 1 (:func:`~nnunet_pgl.tau_schedule`).
    From ``cfg.schedule_extension['start_step']`` on (a resumed run whose ``--epochs`` differs from the epochs its
    checkpoint was scheduled for, e.g. a finished run extended), both are joined to the values of the step before
    by :func:`~nnunet_pgl.rewarm`: a linear ramp over ``ramp_steps`` from the recorded ``lr`` / ``tau`` to the new
    schedules, which they follow from then on.
    """
    it = cfg.iters_per_epoch
    total = cfg.epochs * it

    def lr_at(s: int) -> float:
        return warmup_cosine_lr(s, total, cfg.initial_lr, cfg.warmup_epochs * it)

    def tau_at(s: int) -> float:
        return tau_schedule(s, total, cfg.base_tau)

    ext = cfg.schedule_extension
    if ext is None or step < ext["start_step"]:
        return lr_at(step), tau_at(step)
    s0, w = int(ext["start_step"]), int(ext["ramp_steps"])
    return rewarm(step, s0, float(ext["lr"]), w, lr_at), rewarm(step, s0, float(ext["tau"]), w, tau_at)


class nnUNetPretrainerPGL(nnUNetTrainer):
    """PGL pretraining (local consistency). Configure with ``pgl_pretrain`` (see :mod:`.config`)."""

    method = "pgl"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:  # nnU-Net assumes one node and CUDA under DDP; allow torchrun on several nodes and CPU/gloo
            if device.type == "cpu":
                self.device, self.grad_scaler = torch.device("cpu"), None
            elif device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.local_rank)))
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
        self.online = self.target = self.model = None
        self.augment = IntensityAugmentation() if cfg.intensity_aug else None
        self.pgl_log: List[Dict[str, Any]] = []
        self._epoch_stats: Dict[str, Any] = {}
        self.bad_steps_total = 0
        self._last_checkpoint: Optional[Tuple[str, int]] = None  # (path, epoch) of the newest checkpoint on disk
        self._bad_streak = 0
        self.view_generator: Optional[torch.Generator] = None
        self.pretrain_cases: List[Dict[str, Any]] = []
        # dense linear probe (rank 0) and collapse/shortcut statistics (local rank 0), see _probe_and_collapse
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
            self.model = torch.compile(self.online)
            self.target_model = torch.compile(self.target)
        else:
            self.target_model = self.target
        if self.is_ddp:
            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
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
        unwrap_network(self.network).decoder.deep_supervision = enabled

    def _case_lists(self) -> List[Dict[str, Any]]:
        """Pretraining cases: labeled images (minus fold K's validation cases) and ingested unlabeled cases."""
        cfg = self.pgl_config
        cases: List[Dict[str, Any]] = []
        if cfg.use_labeled_images:
            ids = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
            if cfg.exclude_fold is not None:
                splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
                if not isfile(splits_file):
                    self.print_to_log_file("Creating new 5-fold cross-validation split...")
                    if self.local_rank == 0:
                        save_json(generate_crossval_split(ids, seed=12345, n_splits=5), splits_file)
                    if self.is_ddp:
                        dist.barrier()
                splits = load_json(splits_file)
                if not 0 <= cfg.exclude_fold < len(splits):
                    raise ValueError(f"--exclude-fold {cfg.exclude_fold}: {splits_file} has folds 0-{len(splits) - 1}")
                val = set(splits[cfg.exclude_fold]["val"])
                self.print_to_log_file(f"--exclude-fold {cfg.exclude_fold}: leaving out {len(val)} validation cases")
                ids = [i for i in ids if i not in val]
            hashes = self._labeled_hashes(ids)
            for i in ids:
                cases.append({"case_id": i, "kind": "labeled", "sha256": hashes[i],
                              "data_file": join(self.preprocessed_dataset_folder, i + ".b2nd")})
        for u in cfg.unlabeled_cases:
            cases.append({"case_id": u["case_id"], "kind": "unlabeled", "sha256": u["sha256"],
                          "source": list(u.get("source", [])), "data_file": u["data_file"]})
        return cases

    def _labeled_hashes(self, ids: List[str]) -> Dict[str, str]:
        """sha256 of each labeled case's preprocessed image (cached by size/mtime beside the output)."""
        cache_file = join(self.output_folder, "case_hashes.json")
        cache = load_json(cache_file) if isfile(cache_file) else {}
        out = {i: file_hash(join(self.preprocessed_dataset_folder, i + ".b2nd"), cache) for i in ids}
        if self.local_rank == 0:
            save_json(cache, cache_file)
        return out

    def get_dataloaders(self):
        cfg = self.pgl_config
        self.pretrain_cases = self._case_lists()
        n_lab = sum(c["kind"] == "labeled" for c in self.pretrain_cases)
        self.print_to_log_file(f"Pretraining cases: {n_lab} labeled images, {len(self.pretrain_cases) - n_lab} "
                               "unlabeled")
        region = region_size_for(self.configuration_manager.patch_size, cfg.scale_range[1])
        workers = cfg.num_workers if cfg.num_workers is not None else min(4, get_allowed_n_proc_DA())
        ds = RegionDataset([c["data_file"] for c in self.pretrain_cases], region, self.batch_size,
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
                    if n.endswith((".tmp", ".tmp.png")):
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
        cfg = self.pgl_config
        step = self.current_epoch * self.num_iterations_per_epoch + self._iter
        lr, tau = scheduled_lr_tau(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._epoch_stats["lr"], self._epoch_stats["tau"] = lr, tau
        # per-step seed: views and intensity draws of step k are the same in a resumed and an uninterrupted run
        self.view_generator.manual_seed(hash((cfg.seed, self.local_rank, step)) & 0xFFFF_FFFF_FFFF)
        # a pair's two regions (B, 2, C, *R); the offsets (B, 2, 3) stay on the host, where make_view_pair checks
        # them without a device synchronisation, and then move them itself
        regions = batch["data"].to(self.device, non_blocking=True)
        offset = batch["offset"]
        patch = self.configuration_manager.patch_size
        with torch.no_grad():
            va, vb, pa, pb = make_view_pair(regions[:, 0], patch, scale_range=tuple(cfg.scale_range),
                                            min_overlap=cfg.min_overlap, flip_prob=cfg.flip_prob,
                                            generator=self.view_generator, region_offset=offset[:, 0],
                                            region_b=regions[:, 1], region_offset_b=offset[:, 1])
            self._epoch_stats.setdefault("overlap", []).append(pair_overlap(pa, pb))
            x = torch.cat([va, vb])
            if self.augment is not None:
                x = self.augment(x, generator=self.view_generator)

        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        with amp:
            out = self.model(x, pa, pb)
            with torch.no_grad():
                tgt = self.target_model(x, pa, pb, use_predictor=False)
            loss, per_level, glob = pgl_loss(out, tgt, cfg.global_weight)

        bad = torch.logical_not(torch.isfinite(loss.detach())).float()
        if self.is_ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bool(bad.item()):
            self._skip_bad_step(float(loss.detach().float().cpu()))
            return {}
        self._bad_streak = 0
        params = [p for p in self.online.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
        ema_update_(self.target, self.online, tau)
        self._epoch_stats["losses"].append(loss.detach())
        self._epoch_stats["levels"].append(torch.stack([lv.detach() for lv in per_level]) if per_level else None)
        if glob is not None:
            self._epoch_stats["global"].append(glob.detach())
        if self._collapse is not None and self._iter % cfg.collapse_every == 0:
            self._collapse.update(tgt, self.online.loss_levels, pa, pb, self.online.geometry)
        self._iter += 1
        if self._show_progress:
            print(f"\r  iteration {self._iter}/{self.num_iterations_per_epoch}  loss {float(loss):.4f}",
                  end="", flush=True)
        return {}

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

    def on_train_epoch_end(self, train_outputs: List[dict]):
        if self._show_progress:
            print()
        st = self._epoch_stats
        # sums of the epoch's step losses, all on the training device (where the step losses are; fp32 there, as
        # MPS has no fp64), reduced over the ranks there, then copied to the host once
        dev = self.device
        losses = torch.stack(st["losses"]).float() if st["losses"] else torch.zeros(0, device=dev)
        lv = [x for x in st["levels"] if x is not None]
        levels = torch.stack(lv).float() if lv else torch.zeros(0, 0, device=dev)
        glob = torch.stack(st["global"]).float() if st["global"] else torch.zeros(0, device=dev)
        stats = torch.cat([losses.sum().view(1), levels.sum(0).view(-1), glob.sum().view(1),
                           torch.full((1,), float(len(losses)), device=dev)])
        if self.is_ddp:
            dist.all_reduce(stats)
        stats = stats.cpu().double()
        n = float(stats[-1])
        if n == 0:  # every step of the epoch was skipped (non-finite losses): no loss to report
            st["loss"], st["level_losses"], st["global_loss"] = None, None, None
            return
        st["loss"] = float(stats[0]) / n
        st["level_losses"] = [float(v) / n for v in stats[1:-2]]
        st["global_loss"] = float(stats[-2]) / n if st["global"] else None

    def on_validation_epoch_start(self):
        pass

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        pass

    def on_epoch_end(self):
        st = self._epoch_stats
        dt = time.time() - st["t0"]
        wait = self.dataloader_train.pop_wait() if self.dataloader_train is not None else 0.0
        world = dist.get_world_size() if self.is_ddp else 1
        rec = {"epoch": self.current_epoch, "loss": st.get("loss"), "level_losses": st.get("level_losses"),
               "levels": list(self.online.loss_levels), "global_loss": st.get("global_loss"),
               "lr": st.get("lr"), "tau": st.get("tau"), "epoch_time_s": dt,
               "data_wait_fraction": wait / dt if dt > 0 else 0.0,
               "views_per_s": 2 * self.batch_size * world * self.num_iterations_per_epoch / dt if dt > 0 else 0.0,
               "bad_steps": st["bad"], "mean_overlap": self._mean_overlap()}
        if self.is_ddp:
            rec["ranks_in_sync"] = self._ranks_in_sync()
            if not rec["ranks_in_sync"]:
                self.print_to_log_file("WARNING: the ranks' weights differ (DDP out of sync)")
        self.pgl_log.append(rec)
        self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
        parts = [f"level {l}: {v:.4f}" for l, v in zip(rec["levels"], rec["level_losses"] or [])]
        if rec["global_loss"] is not None:
            parts.append(f"global: {rec['global_loss']:.4f}")
        loss = f"{rec['loss']:.4f} ({', '.join(parts)})" if rec["loss"] is not None else "n/a (every step skipped)"
        self.print_to_log_file(f"loss {loss} lr {rec['lr']:.5f} tau {rec['tau']:.5f}")
        overlap = "n/a" if rec["mean_overlap"] is None else f"{100 * rec['mean_overlap']:.1f} %"
        self.print_to_log_file(f"Epoch time: {dt:.2f} s, data wait {100 * rec['data_wait_fraction']:.1f} %, "
                               f"{rec['views_per_s']:.1f} views/s, mean view overlap {overlap}")
        self._probe_and_collapse(rec)
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0:
            save_json(self.pgl_log, join(self.output_folder, "pgl_log.json"))
            plot_pgl_progress(self.pgl_log, join(self.output_folder, "progress.png"))
            if (self.current_epoch + 1) % self.save_every == 0 or self.current_epoch == self.num_epochs - 1:
                self.save_picture()
        self.current_epoch += 1

    # ------------------------------------------------------------------------------------------- probe, collapse
    @property
    def probe_levels(self) -> List[int]:
        """The probe's levels: the loss levels, or the default levels for BYOL (whose loss has none)."""
        return list(self.online.loss_levels) or default_levels(level_strides(self.network))

    def _probe_start(self) -> None:
        """Rank 0: read the probe's crops (:mod:`nnunet_pgl.evaluation.probe`) and, on a fresh run, score the
        random-initialised network; a resumed run keeps the random-init score of its ``pgl_log``."""
        self._probe_init = next((r["probe_random_init"] for r in self.pgl_log if r.get("probe_random_init")), None)
        cfg = self.pgl_config
        if self.local_rank != 0:
            return
        if not cfg.probe:
            self.print_to_log_file("Probe: off (--no-probe)")
            return
        if not cfg.use_labeled_images:
            self.print_to_log_file(
                "Probe: off. The dense linear probe is fitted and scored on the dataset's labeled training cases, and "
                "this run uses the unlabeled folders only (--no-labeled-images). To score a checkpoint on a labeled "
                f"dataset, run pgl_probe -d DATASET -c {self.configuration_name} -p {self.plans_manager.plans_name} "
                "CHECKPOINT random")
            return
        try:
            self._probe_set = build_probe_set(self.preprocessed_dataset_folder_base, self.preprocessed_dataset_folder,
                                              self.configuration_manager.patch_size, self.label_manager,
                                              cfg.probe_cases, cfg.exclude_fold, cfg.probe_samples)
        except (ProbeUnavailable, ValueError) as e:
            self.print_to_log_file(f"Probe: off: {e}")
            return
        ids = self._probe_set.case_ids
        self.print_to_log_file(f"Probe: levels {self.probe_levels}, fitted on {', '.join(ids['fit'])}, scored on "
                               f"{', '.join(ids['score'])} (one patch-sized crop each, up to {cfg.probe_samples} "
                               "voxels per class); score = mean foreground F1")
        if self.current_epoch == 0 and self._probe_init is None:
            self._probe_init = self._run_probe("random init")

    def _run_probe(self, when: str) -> Optional[Dict[str, Any]]:
        """Probe the online network now; a failing probe (e.g. out of memory) is logged and never stops the run."""
        assert self._probe_set is not None
        try:
            res = probe_network(self.network, self.probe_levels, self._probe_set, self.device, self.online.geometry)
        except Exception as e:  # the probe is a diagnostic: days of pretraining must not end because of it
            self.print_to_log_file(f"WARNING: the probe ({when}) failed and was skipped, training goes on: "
                                   f"{type(e).__name__}: {e}")
            return None
        base = "" if self._probe_init is None or when == "random init" else \
            f"; random init: {format_scores(self._probe_init)}"
        self.print_to_log_file(f"Probe ({when}): {format_scores(res)}{base} [{res['time_s']:.1f} s]")
        return res

    def _probe_and_collapse(self, rec: Dict[str, Any]) -> None:
        """Add the epoch's collapse/shortcut statistics and, when due, the probe to ``rec``; log them and warn."""
        if self._collapse is not None and self._collapse.steps:
            stats = self._collapse.summary()
            self._collapse.reset()
            rec["collapse"] = [s.to_json() for s in stats]
            first = next((r["collapse"] for r in self.pgl_log if r is not rec and r.get("collapse")), None)

            def r2(v: Optional[float]) -> str:
                return "n/a" if v is None else f"{v:.2f}"
            self.print_to_log_file("Collapse/shortcut: " + "; ".join(
                f"{'global' if s.level < 0 else f'level {s.level}'}: spread {s.spread:.3f}, effective rank "
                f"{s.effective_rank:.1f}" + ("" if s.level < 0 else f", R² view {r2(s.r2_view)} / region "
                                             f"{r2(s.r2_region)}") for s in stats))
            for w in collapse_warnings(stats, [LevelStats(**d) for d in first] if first else None):
                self.print_to_log_file(f"WARNING: {w}")
        if self._probe_init is not None and not any("probe_random_init" in r for r in self.pgl_log):
            rec["probe_random_init"] = self._probe_init
        due = (self.current_epoch + 1) % self.save_every == 0 or self.current_epoch == self.num_epochs - 1
        res = self._run_probe(f"epoch {self.current_epoch}") if self._probe_set is not None and due else None
        if res is not None:
            rec["probe"] = res
            self.print_to_log_file(f"Probe time: {100 * res['time_s'] / max(rec['epoch_time_s'], 1e-9):.1f} % of this "
                                   "epoch's training time")

    def _mean_overlap(self) -> Optional[float]:
        """Mean :func:`~nnunet_pgl.views.pair_overlap` of the epoch's view pairs over all ranks (None: no pairs)."""
        ov = self._epoch_stats.get("overlap") or []
        if ov:
            c = torch.cat(ov).double()
            sums = torch.stack([c.sum(), torch.full((), float(c.numel()), dtype=c.dtype, device=c.device)])
        else:
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.is_ddp:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
        total, n = sums.cpu().tolist()
        return total / n if n > 0 else None

    def save_picture(self) -> None:
        """``pictures/epoch_XXXX.png`` for the first pretraining case (see :mod:`.pictures`); never fatal."""
        try:
            import blosc2
            from nnunet_pgl.pretraining.loader import cube_region_size_for, read_region
            from nnunet_pgl.pretraining.pictures import feature_picture
            case = self.pretrain_cases[0]
            arr = blosc2.open(urlpath=case["data_file"], mode="r", mmap_mode="r")
            # one region large enough for pairs down to min_overlap, so the two views differ in position as in
            # training (a position shortcut shows as the same colours at the same view position)
            size = cube_region_size_for(self.configuration_manager.patch_size, self.pgl_config.scale_range,
                                        self.pgl_config.min_overlap)
            start = [(n - r) // 2 for n, r in zip(arr.shape[1:], size)]
            region = torch.from_numpy(read_region(arr, start, size))[None].to(self.device)
            levels = self.online.loss_levels or [len(self.online.features.strides) - 1]
            feature_picture(self.online, region, self.configuration_manager.patch_size, levels,
                            join(self.output_folder, "pictures", f"epoch_{self.current_epoch:04d}.png"),
                            f"{case['case_id']}, epoch {self.current_epoch}")
        except Exception as e:  # a picture must never stop a pretraining run
            self.print_to_log_file(f"WARNING: could not write the feature picture: {type(e).__name__}: {e}")

    def _ranks_in_sync(self) -> bool:
        """All-gather a weighted checksum of the online weights: True if every rank holds the same values."""
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() * (i + 1) for i, p in
                                enumerate(self.online.parameters())]).sum().view(1).to(self.device)
        gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sums)
        vals = torch.cat(gathered)
        return bool((vals.max() - vals.min()).abs() <= 1e-9 * vals.abs().max().clamp_min(1.0))

    def on_train_end(self):
        super().on_train_end()
        if self.dataloader_train is not None:
            self.dataloader_train.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining has no validation. Fine-tune with: nnUNetv2_train "
                               f"{self.plans_manager.dataset_name} {self.configuration_name} FOLD -pretrained_weights "
                               f"{join(self.output_folder, 'checkpoint_final.pth')}")

    # ------------------------------------------------------------------------------------------- checkpoints
    def pgl_meta(self) -> Dict[str, Any]:
        cases = [{k: c[k] for k in ("case_id", "kind", "sha256") if k in c} | ({"source": c["source"]} if "source" in c else {})
                 for c in self.pretrain_cases]
        return build_meta(self.plans_manager, self.configuration_name, self.num_input_channels, self.method,
                          self.online.loss_levels, cases)

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return

        init_args = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in self.my_init_kwargs.items()}
        ckpt = {  # host tensors only: the file loads on any machine (a CPU-only one too) without map_location
            "network_weights": _to_cpu(unwrap_network(self.network).state_dict()),
            "pgl_heads": _to_cpu({k: v for k, v in self.online.state_dict().items() if not k.startswith("features.")}),
            "pgl_target": _to_cpu(self.target.state_dict()),
            "optimizer_state": _to_cpu(self.optimizer.state_dict()),  # load_state_dict moves it to the params
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "pgl_log": self.pgl_log,
            "_best_ema": None,
            "current_epoch": self.current_epoch + 1,
            "init_args": init_args,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": None,
            "pgl_meta": self.pgl_meta(),
            "pgl_config": self.pgl_config.to_json(),
            "bad_steps_total": self.bad_steps_total,
        }
        tmp = filename + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
        self._last_checkpoint = (filename, self.current_epoch + 1)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            filename_or_checkpoint = self._newest_checkpoint(filename_or_checkpoint)
        ckpt = (torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
                if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint)
        if "pgl_target" not in ckpt:
            raise ValueError("this checkpoint was not written by a PGL pretrainer (no 'pgl_target'); --c resumes "
                             "only pgl_pretrain runs")
        saved_levels = (ckpt.get("pgl_meta") or {}).get("levels")
        if saved_levels is not None and [int(v) for v in saved_levels] != list(self.online.loss_levels):
            where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
            raise ResumeError(f"{where} was pretrained with loss levels {list(saved_levels)}, but this run builds "
                              f"levels {list(self.online.loss_levels)}. Resume with --c --levels "
                              f"{' '.join(str(v) for v in saved_levels)}. Other levels make a new run: start it "
                              "without --c under another $nnUNet_results (here it would replace this run's "
                              "checkpoints)")
        unwrap_network(self.network).load_state_dict(ckpt["network_weights"])
        heads = {k: v for k, v in self.online.state_dict().items() if k.startswith("features.")}
        heads.update(ckpt["pgl_heads"])
        self.online.load_state_dict(heads)
        self.target.load_state_dict(ckpt["pgl_target"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.logger.load_checkpoint(ckpt["logging"])
        self.pgl_log = list(ckpt.get("pgl_log", []))
        self.current_epoch = ckpt["current_epoch"]
        self.bad_steps_total = ckpt.get("bad_steps_total", 0)
        if isinstance(filename_or_checkpoint, str):
            self._last_checkpoint = (filename_or_checkpoint, self.current_epoch)
        self._resume_schedule(ckpt.get("pgl_config"))

    def _newest_checkpoint(self, path: str) -> str:
        """nnU-Net's ``--c`` prefers ``checkpoint_final.pth`` to ``checkpoint_latest.pth``. When a finished run was
        extended (``--c --epochs N``) and then interrupted, the final one is the finished run and the latest one the
        extension's progress: resume from whichever holds more epochs."""
        latest = join(os.path.dirname(path), "checkpoint_latest.pth")
        if os.path.basename(path) != "checkpoint_final.pth" or not isfile(latest):
            return path

        def epochs(p: str) -> int:  # mmap: reads the small header, not the weights
            return int(torch.load(p, map_location="cpu", weights_only=False, mmap=True)["current_epoch"])

        e_final, e_latest = epochs(path), epochs(latest)
        if e_latest <= e_final:
            return path
        self.print_to_log_file(f"Resuming from checkpoint_latest.pth (epoch {e_latest}): it is newer than "
                               f"checkpoint_final.pth (epoch {e_final}), the finished run that this run extends")
        return latest

    def _resume_schedule(self, saved: Optional[Dict[str, Any]]) -> None:
        """Take over the checkpoint's schedule state; if this run's length differs from the one the checkpoint was
        scheduled for (``--c --epochs N``), record where the schedule changes and from which learning rate and τ
        (``pgl_config.schedule_extension``, saved with every later checkpoint), see :func:`scheduled_lr_tau`."""
        cfg = self.pgl_config
        if saved is None:
            return
        keys = ("epochs", "iters_per_epoch", "initial_lr", "warmup_epochs", "base_tau", "schedule_extension")
        old = replace(cfg, **{k: saved[k] for k in keys if k in saved})
        cfg.schedule_extension = old.schedule_extension
        it = cfg.iters_per_epoch
        start, remaining = self.current_epoch * it, (cfg.epochs - self.current_epoch) * it
        if (old.epochs, old.iters_per_epoch) == (cfg.epochs, it) or self.current_epoch == 0 or remaining <= 0:
            return
        lr0, tau0 = scheduled_lr_tau(old, self.current_epoch * old.iters_per_epoch - 1)  # the last step trained
        ramp = rewarm_steps(cfg.epochs * it - old.epochs * old.iters_per_epoch, it, remaining)
        cfg.schedule_extension = {"start_step": start, "start_epoch": self.current_epoch, "from_epochs": old.epochs,
                                  "from_iters_per_epoch": old.iters_per_epoch, "lr": lr0, "tau": tau0,
                                  "ramp_steps": ramp}
        lr1, tau1 = scheduled_lr_tau(cfg, start + ramp - 1)
        self.print_to_log_file(
            f"Schedule changed from {old.epochs} to {cfg.epochs} epochs at epoch {self.current_epoch}: the learning "
            f"rate moves linearly from {lr0:.4g} to {lr1:.4g} and the EMA tau from {tau0:.6f} to {tau1:.6f} over "
            f"{ramp} iterations ({ramp / it:g} epochs), then both follow the {cfg.epochs}-epoch schedules")


class nnUNetPretrainerBYOL(nnUNetPretrainerPGL):
    """The global-consistency baseline (BYOL on the pooled bottleneck), same network, data and schedule."""

    method = "byol"


class nnUNetPretrainerPGLBYOL(nnUNetPretrainerPGL):
    """Local (PGL) plus global (BYOL) consistency."""

    method = "pgl+byol"


def _plot_probe(ax: Any, probed: List[Dict[str, Any]], init: Optional[Dict[str, Any]]) -> None:
    """Probe panel: mean foreground F1 per level and for all levels against epoch, the random-initialised network
    at epoch -1 (and dotted across, for all levels)."""
    runs = ([init] if init is not None else []) + [r["probe"] for r in probed]
    ep = ([-1] if init is not None else []) + [r["epoch"] for r in probed]

    def val(v: Optional[float]) -> float:
        return np.nan if v is None else v

    for i, lvl in enumerate(probed[-1]["probe"]["levels"]):
        ax.plot(ep, [val(p["levels"].get(lvl)) for p in runs], "o--", color=f"C{i}", label=f"level {lvl}")
    ax.plot(ep, [val(p["all"]) for p in runs], "ko-", label="all levels")
    if init is not None and init.get("all") is not None:
        ax.axhline(init["all"], color="k", linestyle=":", label="all levels, random init")
    ax.set_ylabel("probe: mean foreground F1"), ax.set_xlabel("epoch (-1: random init)"), ax.legend()


def plot_pgl_progress(log: List[Dict[str, Any]], path: str) -> None:
    """``progress.png``: total/per-level loss, lr and τ, epoch time and data-wait fraction, views/s and the mean
    view overlap, and the dense linear probe (when it ran) against the random-init score."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    if not log:
        return
    ep = [r["epoch"] for r in log]
    probed = [r for r in log if r.get("probe")]
    fig, ax = plt.subplots(5 if probed else 4, 1, figsize=(10, 17.5 if probed else 14))
    ax[0].plot(ep, [np.nan if r["loss"] is None else r["loss"] for r in log], "b-", label="total")
    for i, lvl in enumerate(log[-1]["levels"]):
        ax[0].plot(ep, [r["level_losses"][i] if r["level_losses"] and i < len(r["level_losses"]) else np.nan
                        for r in log], "--", label=f"level {lvl}")
    if log[-1].get("global_loss") is not None:
        ax[0].plot(ep, [np.nan if r.get("global_loss") is None else r["global_loss"] for r in log], ":",
                   label="global (BYOL)")
    ax[0].set_ylabel("loss"), ax[0].legend()
    ax[1].plot(ep, [r["lr"] for r in log], "g-", label="learning rate")
    ax[1].set_ylabel("learning rate")
    ax1b = ax[1].twinx()
    ax1b.plot(ep, [r["tau"] for r in log], "r-", label="tau")
    ax1b.set_ylabel("EMA tau")
    ax[2].plot(ep, [r["epoch_time_s"] for r in log], "k-")
    ax[2].set_ylabel("epoch time [s]")
    ax2b = ax[2].twinx()
    ax2b.plot(ep, [100 * r["data_wait_fraction"] for r in log], "m-")
    ax2b.set_ylabel("data wait [%]")
    ax[3].plot(ep, [r["views_per_s"] for r in log], "c-")
    ax[3].set_ylabel("views / s"), ax[3].set_xlabel("epoch")
    ax3b = ax[3].twinx()
    ax3b.plot(ep, [np.nan if r.get("mean_overlap") is None else 100 * r["mean_overlap"] for r in log], "y-")
    ax3b.set_ylabel("mean view overlap [%]")
    if probed:
        _plot_probe(ax[4], probed, next((r["probe_random_init"] for r in log if r.get("probe_random_init")), None))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
