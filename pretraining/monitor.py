"""What a pretraining run shows while it runs, hook by hook: the epoch's losses reduced on the training device and
copied to the host once (``on_train_epoch_end``); the epoch record (``pgl_log.json``, the log lines,
``progress.png``, checkpoints and pictures when due: ``on_epoch_end``); the dense linear probe (rank 0) and the
collapse/shortcut statistics (rank 0) at the epoch ends :meth:`MonitorHooks._probe_and_collapse` picks.

A mixin of :class:`~nnunet_pgl.pretraining.pretrainer.nnUNetPretrainerPGL` (it uses the trainer's ``online``
branch, ``network``, ``pgl_config``, ``pgl_log`` and logging); its state is set in the trainer's ``__init__``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from torch import distributed as dist

from nnunet_pgl import default_levels, level_strides
from nnunet_pgl.collapse import CollapseMonitor, LevelStats, collapse_warnings
from nnunet_pgl.evaluation.probe import ProbeSet, ProbeUnavailable, build_probe_set, format_scores, probe_network
from nnunet_pgl.pretraining.atomic import atomic_write_json
from nnunet_pgl.pretraining.pictures import plot_pgl_progress


if TYPE_CHECKING:  # to the type checker, the mixin is the nnU-Net trainer it is mixed into (it uses its attributes)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _Trainer
else:
    _Trainer = object


def _r2(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


class MonitorHooks(_Trainer):
    """Epoch-end logging, probe and collapse statistics of a pretraining run (see the module docstring)."""

    _probe_set: Optional[ProbeSet]
    _probe_init: Optional[Dict[str, Any]]
    _collapse: Optional[CollapseMonitor]

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
            self.print_to_log_file("Collapse/shortcut: " + "; ".join(
                f"{'global' if s.level < 0 else f'level {s.level}'}: spread {s.spread:.3f}, effective rank "
                f"{s.effective_rank:.1f}" + ("" if s.level < 0 else f", R² view {_r2(s.r2_view)} / region "
                                             f"{_r2(s.r2_region)}") for s in stats))
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
            atomic_write_json(join(self.output_folder, "pgl_log.json"), self.pgl_log)
            plot_pgl_progress(self.pgl_log, join(self.output_folder, "progress.png"))
            if (self.current_epoch + 1) % self.save_every == 0 or self.current_epoch == self.num_epochs - 1:
                self.save_picture()
        self.current_epoch += 1

    def _mean_overlap(self) -> Optional[float]:
        """Mean :func:`~nnunet_pgl.views.pair_overlap` of the epoch's view pairs over all ranks (None: no pairs)."""
        ov = self._epoch_stats.get("overlap") or []
        if ov:  # float32, as MPS has no float64: a mean of fractions in [0, 1] needs no more
            c = torch.cat(ov).float()
            sums = torch.stack([c.sum(), torch.full((), float(c.numel()), dtype=c.dtype, device=c.device)])
        else:
            sums = torch.zeros(2, dtype=torch.float32, device=self.device)
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
            arr = blosc2.open(urlpath=case.data_file, mode="r", mmap_mode="r")
            # one region large enough for pairs down to min_overlap, so the two views differ in position as in
            # training (a position shortcut shows as the same colours at the same view position)
            size = cube_region_size_for(self.configuration_manager.patch_size, self.pgl_config.scale_range,
                                        self.pgl_config.min_overlap)
            start = [(n - r) // 2 for n, r in zip(arr.shape[1:], size)]
            region = torch.from_numpy(read_region(arr, start, size))[None].to(self.device)
            levels = self.online.loss_levels or [len(self.online.features.strides) - 1]
            feature_picture(self.online, region, self.configuration_manager.patch_size, levels,
                            join(self.output_folder, "pictures", f"epoch_{self.current_epoch:04d}.png"),
                            f"{case.case_id}, epoch {self.current_epoch}")
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
