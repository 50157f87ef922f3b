"""The figure of ``pgl_compare``'s report: paired Dice differences, learning curves, Dice vs labeled fraction."""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from nnunet_pgl.evaluation.report import FractionResult, Report, fraction_label
from nnunet_pgl.evaluation.results import OVERALL, Comparison
from nnunet_pgl.evaluation.stats import bootstrap_ci


def _plot_differences(ax: Any, main: FractionResult, c: Comparison, names: Dict[str, str]) -> None:
    """Per class: the cases' Dice differences (points) and their mean with the 95 % CI (bar)."""
    labs = [OVERALL] + c.labels
    rng = np.random.default_rng(0)
    for i, lab in enumerate(labs):
        e = c.classes[lab]
        d = np.array([x.diff for x in e.cases if x.diff is not None], dtype=float)
        ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=12, alpha=0.6, color="tab:gray")
        s = e.Dice
        if s.n:
            ax.errorbar(i + 0.3, s.mean_diff, yerr=[[s.mean_diff - s.ci_low], [s.ci_high - s.mean_diff]],
                        fmt="o", color="tab:red", capsize=4)
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(labs)))
    ax.set_xticklabels([OVERALL if lab == OVERALL else names.get(lab, lab) for lab in labs], rotation=30, ha="right")
    ax.set_ylabel("Δ Dice = A − B")
    ax.set_title(f"A − B per case ({fraction_label(main.fraction)}, n={c.n_cases})\nA = {main.trainers[0]}\n"
                 f"B = {main.trainers[1]}", fontsize=9)


def _plot_curves(loss_ax: Any, dice_ax: Any, main: FractionResult, color_a: str, color_b: str) -> None:
    """Losses and EMA pseudo Dice per epoch, one line per arm and fold."""
    from matplotlib.ticker import MaxNLocator
    for arm, curves in (main.curves or {}).items():
        col = color_a if arm == main.trainers[0] else color_b
        for j, (fold, cur) in enumerate(sorted(curves.items())):
            if cur is None:
                continue
            ep = np.arange(len(cur.train_losses))
            lbl = arm if j == 0 else None
            marker = "." if len(ep) < 5 else None
            loss_ax.plot(ep, cur.train_losses, color=col, lw=1, label=lbl, marker=marker)
            loss_ax.plot(ep, cur.val_losses, color=col, lw=1, ls="--", marker=marker)
            dice_ax.plot(ep, cur.ema_fg_dice, color=col, lw=1, label=lbl, marker=marker)
    loss_ax.set_title("loss (solid: train, dashed: validation)")
    loss_ax.set_xlabel("epoch")
    dice_ax.set_title("EMA pseudo Dice (nnU-Net's checkpoint_best criterion)")
    dice_ax.set_xlabel("epoch")
    for x in (loss_ax, dice_ax):
        x.xaxis.set_major_locator(MaxNLocator(integer=True))
        if x.get_xlim()[1] - x.get_xlim()[0] < 1:  # a single epoch
            x.set_xlim(-0.5, 0.5)
            x.set_xticks([0])
        if x.get_legend_handles_labels()[0]:
            x.legend(fontsize=8)


def _plot_fractions(ax: Any, result: Report, colors: Dict[str, str]) -> None:
    """Foreground Dice (mean, bootstrap 95 % CI) of both arms against the labeled fraction."""
    from matplotlib.ticker import NullFormatter
    done = result.paired()
    fx = [fr.fraction * 100 for fr, _ in done]
    for side, arm, key in ((0, result.pair[0], "a"), (1, result.pair[1], "b")):
        ys, lo, hi = [], [], []
        for _, c in done:
            per_case = [getattr(x, key) for x in c.classes[OVERALL].cases]
            vals = np.array([v for v in per_case if v is not None], dtype=float)
            m = float(vals.mean()) if vals.size else math.nan
            ci = bootstrap_ci(vals, result.n_boot, result.seed) if vals.size else (math.nan, math.nan)
            ys.append(m)
            lo.append(m - ci[0])
            hi.append(ci[1] - m)
        shift = 0.97 if side == 0 else 1.03  # keep the two arms' error bars apart
        ax.errorbar([x * shift for x in fx], ys, yerr=[lo, hi], marker="o", capsize=4, label=arm, color=colors[arm])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(fx)
    ax.set_xticklabels([f"{v:g}" for v in fx])
    ax.set_xlabel("labeled fraction of each fold's training cases (%)")
    ax.set_ylabel("foreground Dice (mean, 95 % CI)")
    ax.set_title("Dice vs labeled fraction")
    ax.legend(fontsize=8)


def plot_figure(result: Report, path: str) -> None:
    """PNG: per-class paired differences, learning curves and (with several fractions) Dice vs labeled fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a, b = result.pair
    done = result.paired()
    main, comparison = max(done, key=lambda pair: pair[0].fraction)
    if len(done) > 1:
        fig, grid = plt.subplots(2, 2, figsize=(11.5, 9))
        axes = [grid[0, 0], grid[1, 0], grid[1, 1], grid[0, 1]]
    else:
        fig, grid = plt.subplots(1, 3, figsize=(16, 4.8))
        axes = list(grid)
    colors = {a: "tab:blue", b: "tab:orange"}
    _plot_differences(axes[0], main, comparison, result.label_names)
    _plot_curves(axes[1], axes[2], main, colors[a], colors[b])
    if len(done) > 1:
        _plot_fractions(axes[3], result, colors)
    fig.suptitle(f"pgl_compare: {result.dataset} ({result.configuration}, {result.plans})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
