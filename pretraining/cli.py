"""``pgl_pretrain``: PGL pretraining on a dataset's nnU-Net plans and preprocessed data (+ unlabeled CT).

Argument parsing over :func:`nnunet_pgl.pretraining.run.pretrain` / :func:`~nnunet_pgl.pretraining.run.pretrain_folds`;
errors the user can fix end with ``pgl_pretrain: error: ...`` and exit code 2, a run stopped by non-finite losses
with exit code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional

from nnunet_pgl.pretraining.helptext import DefaultsOnceFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgl_pretrain",
        description="PGL self-supervised pretraining of the network that a dataset's nnU-Net plans build, on the "
                    "dataset's own images (labels ignored) plus any unlabeled CT. Run after "
                    "nnUNetv2_plan_and_preprocess; fine-tune with nnUNetv2_train ... -tr nnUNetTrainerPGL or "
                    "-pretrained_weights <output>/checkpoint_final.pth.",
        formatter_class=DefaultsOnceFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="Dataset name or ID, as for nnUNetv2_train.")
    p.add_argument("-c", dest="configuration", default="3d_fullres",
                   help="Configuration to pretrain (a 3D one). Fine-tune the same configuration.")
    p.add_argument("-p", dest="plans", default="nnUNetPlans",
                   help="Plans identifier, e.g. nnUNetResEncUNetMPlans. The checkpoint only fits these plans.")
    p.add_argument("--unlabeled", nargs="+", default=[], metavar="DIR",
                   help="Folders of extra unlabeled images (NIfTI, NRRD, MHA, ...; one file per case, or "
                        "_0000-style channel files). They are preprocessed with the dataset's plans once and cached "
                        "beside the preprocessed data. More data is the point of pretraining: add all you have.")
    p.add_argument("--no-labeled-images", action="store_true",
                   help="Pretrain on the unlabeled folders only (by default the dataset's training images are used "
                        "too, without their labels).")
    p.add_argument("--exclude-fold", type=int, default=None, metavar="K",
                   help="Leave out the validation cases of fold K of splits_final.json, so that fold K's validation "
                        "stays unseen; the output goes to fold_K (without it: fold_all), which nnUNetTrainerPGL uses "
                        "for fold K. Use it when you report cross-validation numbers of the fine-tuned model.")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="One pretraining per fold, one after another: --exclude-fold K for each K (e.g. --folds 0 1 2 "
                        "3 4). Resumable: finished folds are skipped, interrupted ones continue (--c), so rerun the "
                        "same command after a kill.")
    p.add_argument("--epochs", type=int, default=None, help="Epochs (default 500, the paper's schedule). With --c, "
                   "another value changes the run's length, e.g. extends a finished run: the learning rate and the "
                   "EMA tau then move linearly, over 1 epoch or 5%% of the added epochs if longer, from their last "
                   "values to the schedules of the new length, which they follow from then on.")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="Iterations per epoch (default 250).")
    p.add_argument("--batch-size", type=int, default=None,
                   help="View pairs per step over all GPUs (default: the plans' batch size). Memory grows ~2.2x "
                        "that of supervised training at the same batch size.")
    p.add_argument("--method", choices=["pgl", "byol", "pgl+byol"], default=None,
                   help="pgl: local consistency (the method). byol: global consistency baseline. pgl+byol: both. "
                        "Each method writes its own output folder.")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="Feature levels of the loss: 0 = full resolution ... n-1 = bottleneck. Default: levels "
                        "with stride >= 2 in every pooled axis (level 0 costs ~2.4x time, ~2.6x memory).")
    p.add_argument("--lr", type=float, default=None, help="Peak learning rate (default 1e-2, SGD nesterov 0.99).")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="Write checkpoint_latest.pth every N epochs (default 5): what --c resumes from after a "
                        "kill or preemption. Lower it on preemptible nodes.")
    p.add_argument("--probe-cases", metavar="N", type=int, default=None,
                   help="Labeled training cases of the dense linear probe (default 8: half to fit it, half to score "
                        "it; fold K's validation cases are never used with --exclude-fold K). The probe scores the "
                        "frozen features at the start, every --save-every epochs and at the end.")
    p.add_argument("--no-probe", action="store_true", help="Turn the dense linear probe off.")
    p.add_argument("--num-workers", type=int, default=None,
                   help="CPU loader processes (default: nnUNet_n_proc_DA rule, at most 4; regions are cheap to "
                        "read, views are made on the GPU).")
    p.add_argument("-num_gpus", type=int, default=1, help="GPUs on this node (nnU-Net's DDP). For several "
                   "nodes launch with torchrun instead (env:// rendezvous).")
    p.add_argument("-device", choices=["cuda", "cpu", "mps"], default="cuda", help="Device to train on.")
    p.add_argument("--c", action="store_true", help="Continue from the latest checkpoint of this run.")
    p.add_argument("--seed", type=int, default=None, help="Seed of the loader and view draws (default 12345).")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="Processes for preprocessing the unlabeled images (default: nnU-Net's default_num_processes).")
    return p


def _fail(msg: str, who: str = "", code: int = 2) -> NoReturn:
    print(f"pgl_pretrain{who}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`~nnunet_pgl.pretraining.run.pretrain`'s keyword arguments from the parsed flags."""
    return dict(method=args.method or "pgl", unlabeled=args.unlabeled, use_labeled_images=not args.no_labeled_images,
                exclude_fold=args.exclude_fold, continue_training=args.c, device=args.device, num_gpus=args.num_gpus,
                num_processes=args.num_processes, probe=not args.no_probe, epochs=args.epochs,
                iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, levels=args.levels, lr=args.lr,
                num_workers=args.num_workers, seed=args.seed, save_every=args.save_every,
                probe_cases=args.probe_cases)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    from nnunet_pgl.pretraining.checkpointing import ResumeError
    from nnunet_pgl.pretraining.lock import RunLockedError
    from nnunet_pgl.pretraining.pretrainer import NonFiniteLossError
    from nnunet_pgl.pretraining.run import PretrainError, pretrain, pretrain_folds, under_torchrun
    rank = os.environ.get("RANK", "0") if under_torchrun() else "0"
    who = "" if rank == "0" else f" (rank {rank})"
    try:
        if args.folds is not None:
            pretrain_folds(args.dataset, args.folds, args.configuration, args.plans, **_kwargs(args))
        else:
            pretrain(args.dataset, args.configuration, args.plans, **_kwargs(args))
    except (PretrainError, RunLockedError) as e:
        _fail(str(e))
    except NonFiniteLossError as e:
        _fail(str(e), who, code=1)
    except ResumeError as e:
        _fail(str(e), who)
    except Exception as e:  # -num_gpus > 1: nnU-Net's mp.spawn re-raises a rank's error as ProcessRaisedException
        text = str(e)
        if type(e).__name__ == "ProcessRaisedException" and "NonFiniteLossError: " in text:
            _fail(text.rsplit("NonFiniteLossError: ", 1)[1].strip(), code=1)
        raise


if __name__ == "__main__":
    main()
