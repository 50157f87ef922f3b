"""``pgl_probe``: the dense linear probe of ``pgl_pretrain`` for any checkpoints on a dataset, without fine-tuning.

    pgl_probe -d D [-c C] [-p P] CHECKPOINT|random ... [--json PATH] [--png PATH] [--exclude-fold K]

Each checkpoint (a ``pgl_pretrain`` checkpoint of any method, an nnU-Net checkpoint, or ``random``: the network
initialised with ``--seed``, as ``pgl_pretrain`` initialises it) is loaded into the network that the plans build,
and its frozen features are scored by :func:`nnunet_pgl.evaluation.probe.probe_network` on the same cases, crops and
voxels for every checkpoint. Output: one table row per checkpoint (printed), ``--json``: each checkpoint (as given
on the command line) → ``{'levels': {'<L>': score}, 'all': score, 'per_class': …, 'cases': …, 'time_s': …}`` with
score = the mean foreground F1 of the probe, and ``--png``: a bar chart of the same numbers. With the same
``--probe-cases``/``--exclude-fold`` (and ``--seed`` for ``random``), the scores are those that ``pgl_pretrain``
logged for its random init and for the epoch of the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional

RANDOM = "random"
DESCRIPTION = ("Score how well frozen network features separate a dataset's classes: a multinomial logistic "
               "regression per feature level (and on all levels together) is fitted on voxels of some labeled "
               "training cases and scored (mean foreground F1 = Dice of the probe) on others. Compares "
               "pretrainings (PGL, BYOL, pgl+byol), nnU-Net checkpoints and random init without fine-tuning. "
               "The same probe runs inside pgl_pretrain.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgl_probe", description=DESCRIPTION)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint files (pgl_pretrain's checkpoint_final.pth / checkpoint_latest.pth, or an nnU-Net "
                        "checkpoint with network_weights) or the word 'random' (random init, seeded by --seed)")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or ID (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration whose network is probed")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier the checkpoints were made with")
    p.add_argument("--exclude-fold", type=int, default=None, metavar="K",
                   help="never use fold K's validation cases (splits_final.json), e.g. to keep them unseen for a "
                        "later cross-validation")
    p.add_argument("--probe-cases", type=int, default=None, metavar="N",
                   help="labeled training cases (default 8, as pgl_pretrain: half to fit, half to score)")
    p.add_argument("--probe-samples", type=int, default=None, metavar="N",
                   help="voxels per class and case crop (default 256, as pgl_pretrain)")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="feature levels (0 = full resolution ... n-1 = bottleneck); default: pgl_pretrain's default "
                        "loss levels (stride >= 2)")
    p.add_argument("--seed", type=int, default=12345,
                   help="seed of the 'random' network (default: pgl_pretrain's default seed, so 'random' is the "
                        "network pgl_pretrain starts from)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the scores as JSON")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="write a bar chart (default with --json: the same path with .png)")
    p.add_argument("-device", choices=["cuda", "cpu", "mps"], default=None,
                   help="device (default: cuda if available, else cpu)")
    return p


def _fail(msg: str) -> NoReturn:
    print(f"pgl_probe: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def strip_prefixes(state: Dict[str, Any]) -> Dict[str, Any]:
    """Remove DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` from state-dict keys."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def read_weights(path: str) -> Dict[str, Any]:
    """``network_weights`` of a pgl_pretrain or nnU-Net checkpoint, or raise ValueError saying what is wrong."""
    import torch
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (give a checkpoint file or the word '{RANDOM}')")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # nnU-Net's own checkpoints hold numpy objects: load them as nnU-Net does
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. Is it a "
                             "complete checkpoint file?") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(f"{path} has no 'network_weights': it is not a pgl_pretrain or nnU-Net checkpoint")
    return strip_prefixes(ckpt["network_weights"])


def load_into(network: Any, weights: Dict[str, Any], path: str, plans: str, configuration: str) -> None:
    """Load every feature weight (all but the segmentation layers, which the probe does not use) or raise
    ValueError naming the first mismatch."""
    own = {k: v for k, v in network.state_dict().items() if ".seg_layers." not in k}
    theirs = {k: v for k, v in weights.items() if ".seg_layers." not in k}
    hint = (f"it was made for another network than plans '{plans}', configuration '{configuration}' build; give "
            "the -p/-c it was trained with")
    missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    if missing or extra:
        raise ValueError(f"{path} does not fit: {len(missing)} weights missing (e.g. {missing[:2]}), {len(extra)} "
                         f"unexpected (e.g. {extra[:2]}); {hint}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(theirs[k].shape):
            raise ValueError(f"{path} does not fit: '{k}' has shape {tuple(theirs[k].shape)} in the checkpoint but "
                             f"{tuple(v.shape)} here; {hint}")
    network.load_state_dict(theirs, strict=False)


def results_table(results: Dict[str, Dict[str, Any]]) -> str:
    """Markdown table: one row per checkpoint, one column per level and one for all levels."""
    levels = sorted({lv for r in results.values() for lv in r["levels"]}, key=int)

    def f(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"
    rows = ["| checkpoint | " + " | ".join(f"level {lv}" for lv in levels) + " | all levels |",
            "|---" * (len(levels) + 2) + "|"]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f(r["levels"].get(lv)) for lv in levels) + f" | {f(r['all'])} |")
    return "\n".join(rows)


def plot_results(results: Dict[str, Dict[str, Any]], path: str, title: str) -> None:
    """Grouped bars: the score per level and for all levels, one bar per checkpoint."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from nnunet_pgl.pretraining.atomic import save_figure

    levels = sorted({lv for r in results.values() for lv in r["levels"]}, key=int)
    groups = [f"level {lv}" for lv in levels] + ["all levels"]
    n = len(results)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) * max(1, n / 2)), 4.5))
    for i, (name, r) in enumerate(results.items()):
        vals = [r["levels"].get(lv) for lv in levels] + [r["all"]]
        ax.bar(np.arange(len(groups)) + (i - (n - 1) / 2) * width,
               [np.nan if v is None else v for v in vals], width, label=os.path.basename(name) if name != RANDOM
               else RANDOM)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("probe: mean foreground F1"), ax.set_ylim(0, 1), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunet_pgl.evaluation.probe import (DEFAULT_CASES, DEFAULT_SAMPLES_PER_CLASS, ProbeUnavailable,
                                             build_probe_set)
    from nnunet_pgl.features import check_levels, default_levels, level_strides
    from nnunet_pgl.pretraining.run import PretrainError, planned_dataset

    try:
        ds = planned_dataset(args.dataset, args.plans, args.configuration, need_results=False)
    except PretrainError as e:
        _fail(str(e))
    name, base, pm, cm = ds.name, ds.base, ds.plans_manager, ds.configuration_manager
    data_folder = os.path.join(base, cm.data_identifier)
    lm = pm.get_label_manager(ds.dataset_json)
    n_in = determine_num_input_channels(pm, cm, ds.dataset_json)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail("-device cuda but no CUDA GPU is visible: use -device cpu")

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        return nnUNetTrainer.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads, False).to(device)

    net = build(args.seed)
    try:
        levels = check_levels(args.levels, len(level_strides(net))) if args.levels else default_levels(
            level_strides(net))
    except ValueError as e:
        _fail(f"--levels: {e}")
    try:
        probe_set = build_probe_set(base, data_folder, cm.patch_size, lm, args.probe_cases or DEFAULT_CASES,
                                    args.exclude_fold, args.probe_samples or DEFAULT_SAMPLES_PER_CLASS)
    except (ProbeUnavailable, ValueError) as e:
        _fail(f"cannot probe {name}: {e}")
    ids = probe_set.case_ids
    print(f"pgl_probe {name} {args.configuration} {args.plans}: levels {levels}; fitted on {', '.join(ids['fit'])}; "
          f"scored on {', '.join(ids['score'])}; score = mean foreground F1 of the probe", flush=True)
    results = probe_checkpoints(args, net, build, levels, probe_set, device)
    write_outputs(results, args.json, args.png, f"{name} {args.configuration}: probe fitted on {len(ids['fit'])} "
                  f"cases, scored on {len(ids['score'])}")


def probe_checkpoints(args: argparse.Namespace, net: Any, build: Callable[[int], Any], levels: List[int],
                      probe_set: Any, device: Any) -> Dict[str, Dict[str, Any]]:
    """Each checkpoint of the command line (once) loaded into ``net`` (``random``: a fresh ``build(seed)``) and
    probed on the same cases and voxels; prints one line per checkpoint."""
    from nnunet_pgl.evaluation.probe import format_scores, probe_network
    from nnunet_pgl.geometry import level_geometry

    geometry = level_geometry(net)
    results: Dict[str, Dict[str, Any]] = {}
    for ck in dict.fromkeys(args.checkpoints):
        if ck == RANDOM:
            net = build(args.seed)
        else:
            try:
                load_into(net, read_weights(ck), ck, args.plans, args.configuration)
            except ValueError as e:
                _fail(str(e))
        res = probe_network(net, levels, probe_set, device, geometry)
        results[ck] = res
        print(f"  {ck}: {format_scores(res)} [{res['time_s']:.1f} s]", flush=True)
    return results


def write_outputs(results: Dict[str, Dict[str, Any]], json_path: Optional[str], png: Optional[str],
                  title: str) -> None:
    """Print the table; write the JSON and the figure (``png`` defaults to the JSON's path with ``.png``)."""
    print()
    print(results_table(results))
    png = png or (os.path.splitext(json_path)[0] + ".png" if json_path else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
        print(f"\nJSON: {json_path}")
    if png:
        plot_results(results, png, title)
        print(f"Figure: {png}")


if __name__ == "__main__":
    main()
