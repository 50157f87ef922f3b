"""Per-level features of nnU-Net's U-Nets (``PlainConvUNet``, ``ResidualEncoderUNet``) by an explicit loop.

Both architectures of dynamic-network-architectures share the structure ``encoder`` (returning the list of skips,
bottleneck last) → ``decoder`` (``UNetDecoder``: for stage ``s``: ``transpconvs[s]`` → concat skip → ``stages[s]``
→ ``seg_layers[s]``). No hooks are used (they do not mix with ``torch.compile``), and nothing of nnunetv2 is
imported: only the module structure is relied on.

Levels are numbered by resolution, like the encoder stages: level ``L`` has the resolution of encoder stage ``L``
and total stride ``prod(encoder.strides[0..L])`` per axis. Level ``n − 1`` is the bottleneck (the last skip);
level ``L < n − 1`` is the output of decoder stage ``n − 2 − L`` (level 0 is the full-resolution decoder output,
the input of the final segmentation layer). Only the decoder stages down to the finest requested level are
computed.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
from torch import nn

Stride = Tuple[int, int, int]


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel``/``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod  # type: ignore[assignment]
        elif isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        else:
            return network


def unet_parts(network: nn.Module) -> Tuple[Any, Any]:
    """The U-Net's ``(encoder, decoder)``, typed loosely: only their module structure is relied on."""
    return getattr(network, "encoder", None), getattr(network, "decoder", None)


def check_unet(network: nn.Module) -> None:
    """Raise ValueError unless ``network`` is a dynamic-network-architectures U-Net (encoder with strides and
    channels, decoder with stages and transposed convolutions)."""
    enc, dec = unet_parts(network)
    ok = (enc is not None and dec is not None and hasattr(enc, "strides") and hasattr(enc, "output_channels")
          and all(hasattr(dec, a) for a in ("stages", "transpconvs")))
    if not ok:
        raise ValueError(f"{type(network).__name__} is not a U-Net of dynamic-network-architectures (PlainConvUNet "
                         "or ResidualEncoderUNet with .encoder.strides and .decoder.stages/.transpconvs); PGL "
                         "feature extraction supports those two architectures")
    if not getattr(enc, "return_skips", True):
        raise ValueError("the encoder was built with return_skips=False; build the U-Net as nnU-Net does")
    if len(enc.strides[0]) != 3:
        raise ValueError(f"PGL is 3D: the network's strides {enc.strides} are not 3D (use a 3d configuration)")


def level_strides(network: nn.Module) -> List[Stride]:
    """Total stride ``(s_z, s_y, s_x)`` of each level 0 … n − 1 (the product of the encoder strides up to it)."""
    net = unwrap_network(network)
    check_unet(net)
    out: List[Stride] = []
    acc = [1, 1, 1]
    for s in unet_parts(net)[0].strides:
        acc = [a * int(b) for a, b in zip(acc, s)]
        out.append((acc[0], acc[1], acc[2]))
    return out


def level_channels(network: nn.Module) -> List[int]:
    """Number of feature channels at each level 0 … n − 1."""
    net = unwrap_network(network)
    check_unet(net)
    return [int(c) for c in unet_parts(net)[0].output_channels]


def default_levels(strides: Sequence[Sequence[int]]) -> List[int]:
    """Levels whose total stride is ≥ 2 in every axis that the network pools at all (bottleneck included).

    *Note* (ours): full-resolution heads cost ~2.4× the step time and ~2.6× the memory on an H100 for little
    evidence of benefit, so they are opt-in.
    """
    last = strides[-1]
    pooled = [i for i in range(3) if last[i] > 1]
    levels = [lvl for lvl, s in enumerate(strides) if pooled and all(s[i] >= 2 for i in pooled)]
    return levels or [len(strides) - 1]


def check_levels(levels: Sequence[int], n_levels: int) -> List[int]:
    """Validate level indices (negative ones count from the bottleneck) and return them sorted, unique."""
    out = sorted({lvl + n_levels if lvl < 0 else lvl for lvl in levels})
    if not out or out[0] < 0 or out[-1] >= n_levels:
        raise ValueError(f"levels {list(levels)} out of range: this network has levels 0 (full resolution) to "
                         f"{n_levels - 1} (bottleneck)")
    return out


def extract_features(network: nn.Module, x: torch.Tensor, levels: Sequence[int]) -> List[torch.Tensor]:
    """Features of ``network`` at ``levels`` for input ``x`` ``(B, C_in, *patch)``.

    Args:
        network: a ``PlainConvUNet`` or ``ResidualEncoderUNet`` (wrappers are stripped; to keep DDP's gradient
            synchronisation, wrap a module that *calls* this function instead, e.g. :class:`UNetFeatures`).
        x: input batch; its spatial size must be divisible by the bottleneck's total stride.
        levels: level indices (see the module docstring).

    Returns:
        One tensor ``(B, C_L, *patch / stride_L)`` per requested level, in the sorted order of ``levels``.
    """
    net = unwrap_network(network)
    check_unet(net)
    enc, dec = unet_parts(net)
    n = len(enc.strides)
    lv = check_levels(levels, n)
    skips = enc(x)
    feats = {n - 1: skips[-1]}
    lres = skips[-1]
    for s in range(n - 1 - lv[0]):  # decoder stage s produces level n - 2 - s
        y = dec.transpconvs[s](lres)
        y = torch.cat((y, skips[-(s + 2)]), 1)
        lres = dec.stages[s](y)
        feats[n - 2 - s] = lres
    return [feats[lvl] for lvl in lv]


class UNetFeatures(nn.Module):
    """``nn.Module`` around :func:`extract_features` (so DDP / ``torch.compile`` can wrap the feature path).

    Also reports which submodules the levels never use (decoder stages above the finest level and the
    segmentation layers), so a pretrainer can freeze them instead of running DDP with unused parameters.
    """

    def __init__(self, network: nn.Module, levels: Sequence[int]):
        super().__init__()
        self.network = unwrap_network(network)
        self.strides = level_strides(self.network)
        self.channels = level_channels(self.network)
        self.levels = check_levels(levels, len(self.strides))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return extract_features(self.network, x, self.levels)

    def unused_modules(self) -> List[nn.Module]:
        """Decoder stages/transposed convs above the finest level, and all segmentation layers."""
        dec = unet_parts(self.network)[1]
        n = len(self.strides)
        first_unused = n - 1 - self.levels[0]
        mods: List[nn.Module] = list(dec.transpconvs[first_unused:]) + list(dec.stages[first_unused:])
        if hasattr(dec, "seg_layers"):
            mods += list(dec.seg_layers)
        return mods
