"""``nnUNetPretrainerPGL``: PGL pretraining of the exact network the plans build, as an ``nnUNetTrainer``.

Driven by nnU-Net's own ``run_training`` (fold ``'all'``), so output folder, log file, plans/dataset copies, ``--c``
and DDP (``-num_gpus``) work as for any trainer. What changes, hook by hook:

* ``initialize``: build the network with nnU-Net's ``build_network_architecture``, wrap it in the online
  :class:`~nnunet_pgl.PGLBranch` (features at the loss levels → alignment → heads), freeze what the loss never
  reaches (segmentation layers, decoder stages above the finest level: no unused parameters under DDP), make the
  EMA target (outside DDP), compile per nnU-Net's ``nnUNet_compile`` rule, DDP-wrap the online branch.
* ``get_dataloaders``: the region loader (:mod:`nnunet_pgl.pretraining.loader`) over labeled and unlabeled cases.
* ``train_step``: views + priors + intensity augmentation on the device, online fwd+bwd of both views as one batch,
  target fwd, loss, clipping, EMA, per-iteration LR/τ schedules, non-finite steps skipped and counted.
* epoch hooks, checkpoints and logging: own per-epoch log (``pgl_log.json``, ``progress.png``); checkpoints hold
  the full U-Net ``network_weights`` (CPU, no prefixes) that stock ``-pretrained_weights`` loads, plus ``pgl_meta``.
* no validation (``perform_actual_validation`` only logs).
"""
from __future__ import annotations

import os
import sys
import time
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
                        make_target, make_view_pair, pgl_loss, tau_schedule, unwrap_network, warmup_cosine_lr)
from nnunet_pgl.pretraining.config import CONFIG_FILE, config_from_env
from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader, region_size_for
from nnunet_pgl.pretraining.lock import RunLock
from nnunet_pgl.pretraining.meta import build_meta, file_hash


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps."""


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
        cfg.levels = list(self.online.features.levels if self.online.use_local else levels)
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
                           cfg.seed + 7919 * self.local_rank, start_batch=self.current_epoch * self.num_iterations_per_epoch)
        loader = TimedLoader(ds, workers, pin_memory=self.device.type == "cuda")
        self.print_to_log_file(f"Region loader: regions {region}, batch {self.batch_size} pairs, {workers} workers")
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
        lr = warmup_cosine_lr(step, self.total_steps, self.initial_lr,
                              cfg.warmup_epochs * self.num_iterations_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        tau = tau_schedule(step, self.total_steps, cfg.base_tau)
        self._epoch_stats["lr"], self._epoch_stats["tau"] = lr, tau
        # per-step seed: views and intensity draws of step k are the same in a resumed and an uninterrupted run
        self.view_generator.manual_seed(hash((cfg.seed, self.local_rank, step)) & 0xFFFF_FFFF_FFFF)
        region = batch["data"].to(self.device, non_blocking=True)
        offset = batch["offset"].to(self.device, non_blocking=True)
        patch = self.configuration_manager.patch_size
        with torch.no_grad():
            va, vb, pa, pb = make_view_pair(region, patch, scale_range=tuple(cfg.scale_range),
                                            min_overlap=cfg.min_overlap, flip_prob=cfg.flip_prob,
                                            generator=self.view_generator, region_offset=offset)
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
        losses = torch.stack(st["losses"]).float() if st["losses"] else torch.zeros(0)
        lv = [x for x in st["levels"] if x is not None]
        levels = torch.stack(lv).float() if lv else torch.zeros(0, 0)
        glob = torch.stack(st["global"]).float() if st["global"] else torch.zeros(0)
        stats = torch.cat([losses.sum().view(1), levels.sum(0).view(-1), glob.sum().view(1),
                           torch.tensor([float(len(losses))], device=losses.device)]).cpu().double()
        if self.is_ddp:
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            stats = stats.cpu()
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
               "bad_steps": st["bad"]}
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
        self.print_to_log_file(f"Epoch time: {dt:.2f} s, data wait {100 * rec['data_wait_fraction']:.1f} %, "
                               f"{rec['views_per_s']:.1f} views/s")
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0:
            save_json(self.pgl_log, join(self.output_folder, "pgl_log.json"))
            plot_pgl_progress(self.pgl_log, join(self.output_folder, "progress.png"))
            if (self.current_epoch + 1) % self.save_every == 0 or self.current_epoch == self.num_epochs - 1:
                self.save_picture()
        self.current_epoch += 1

    def save_picture(self) -> None:
        """``pictures/epoch_XXXX.png`` for the first pretraining case (see :mod:`.pictures`); never fatal."""
        try:
            import blosc2
            from nnunet_pgl.pretraining.loader import read_region
            from nnunet_pgl.pretraining.pictures import feature_picture
            case = self.pretrain_cases[0]
            arr = blosc2.open(urlpath=case["data_file"], mode="r", mmap_mode="r")
            size = region_size_for(self.configuration_manager.patch_size, self.pgl_config.scale_range[1])
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

        def cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in sd.items()}

        init_args = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in self.my_init_kwargs.items()}
        ckpt = {
            "network_weights": cpu(unwrap_network(self.network).state_dict()),
            "pgl_heads": cpu({k: v for k, v in self.online.state_dict().items() if not k.startswith("features.")}),
            "pgl_target": cpu(self.target.state_dict()),
            "optimizer_state": self.optimizer.state_dict(),
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
        ckpt = (torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
                if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint)
        if "pgl_target" not in ckpt:
            raise ValueError("this checkpoint was not written by a PGL pretrainer (no 'pgl_target'); --c resumes "
                             "only pgl_pretrain runs")
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


class nnUNetPretrainerBYOL(nnUNetPretrainerPGL):
    """The global-consistency baseline (BYOL on the pooled bottleneck), same network, data and schedule."""

    method = "byol"


class nnUNetPretrainerPGLBYOL(nnUNetPretrainerPGL):
    """Local (PGL) plus global (BYOL) consistency."""

    method = "pgl+byol"


def plot_pgl_progress(log: List[Dict[str, Any]], path: str) -> None:
    """``progress.png``: total/per-level loss, lr and τ, epoch time and data-wait fraction, views/s."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    if not log:
        return
    ep = [r["epoch"] for r in log]
    fig, ax = plt.subplots(4, 1, figsize=(10, 14))
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
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
