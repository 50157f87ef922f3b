"""Feature geometry: where the voxels of each feature level of a network sit in the view.

A feature level with total stride ``s = (s_z, s_y, s_x)`` has its voxel ``i`` centred at view voxel coordinate
``origin + i·s`` (per axis). The *origin* (the centre of feature voxel 0) depends on how the network computes the
level:

* average pooling by ``s`` (and a patchify convolution with kernel = stride): ``origin = (s − 1)/2``
  (:func:`avg_pool_geometry`; the pure-math tests use it);
* a convolution with odd kernel ``k``, stride ``t`` and padding ``(k − 1)/2`` centres output ``i`` at input
  ``t·i``: the encoder levels of nnU-Net's ``PlainConvUNet`` (kernel-3, stride-2, padding-1 downsampling) have
  ``origin = 0``;
* ``ResidualEncoderUNet`` adds, in the first block of each stage, an average-pool shortcut (centred like average
  pooling) to the strided-convolution path (centred like a convolution): its encoder levels lie between the two;
* a decoder level concatenates its skip (the encoder level) with the transposed convolution of the level below.
  That convolution (kernel = stride ``t``) copies coarse voxel ``i`` to the fine voxels ``t·i … t·i + t − 1``, so
  the upsampled path lags the skip by ``(t − 1)/2`` fine voxels on average, and more at coarser levels.

:func:`level_geometry` measures the geometry instead of assuming it. It builds a *linearised copy* of the network
(every convolution a normalised box kernel, transposed convolutions copying their input to every output they reach,
normalisation, nonlinearities and dropout removed, max pooling read as average pooling over its window) that
computes, per voxel, the view position it stands for: each operation first reduces its input to one position per
voxel, the *equal-weight mean of the positions of the paths that were summed or concatenated*, then applies its
window. The copy is fed the view coordinate along one axis at a time, in float64; a level's response is the
position of each of its voxels, and ``origin`` is the midpoint of ``position − i·s`` over the voxels whose
receptive field lies inside the input (found by padding with NaN: a voxel is finite exactly when no padding
reached it). Encoder levels are linear (``origin + i·s`` to 1e-6 voxels, else the calibration refuses); decoder
levels carry a small phase ripple from the upsampling, bounded by the calibration.

*Note* (ours): calibration rather than reading kernel, stride and padding off a "main path" because it needs no
rule per architecture. It covers strided convolutions of any (odd or even) kernel and padding, pooling encoders
(``pool='avg'``/``'max'``), paths that are summed (ResEnc's residual blocks) or concatenated (the decoder), and
any combination of them; a future architecture built from these modules is calibrated without new code, and one
built from modules it cannot read is refused by name, not silently misaligned. Reading kernels off one path would
have to decide, per architecture, which path is "main".

*Note* (ours): equal weights on the paths that meet. Where two paths of different geometry meet (ResEnc's
convolution path and average-pool shortcut; a decoder's skip and its upsampled path), the trained network's
weighting of them decides where its voxels truly sit, and training can move it anywhere between the two. The
midpoint keeps the misalignment for any weighting within half the distance between the paths, the least
possible worst case; taking either path's position (e.g. "the skip carries the decoder level's position") is exact
for one weighting and off by the whole distance for the other. ``BENCHMARKS.md`` ("Feature geometry") measures
both choices on linearised networks with either path switched off.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .features import check_unet, unet_parts, extract_features, level_strides, unwrap_network

Triple = Tuple[float, float, float]

#: largest calibration length (voxels along the measured axis) before giving up
MAX_CALIBRATION_LENGTH = 1 << 15
#: an encoder level whose centres deviate from ``origin + i·s`` by more than this (view voxels) is not linear
LINEARITY_TOL = 1e-6
#: a decoder level whose centres deviate from ``origin + i·s`` by more than this fraction of ``s`` is not linear
RIPPLE_TOL = 0.5


@dataclass(frozen=True)
class LevelGeometry:
    """Where the voxels of one feature level sit in the view (the network input patch).

    Feature voxel ``i`` (per axis) is centred at view voxel coordinate ``origin + i·stride``.

    Attributes:
        stride: total stride ``(s_z, s_y, s_x)`` in view voxels per feature voxel.
        origin: view voxel coordinate ``(z, y, x)`` of the centre of feature voxel 0.
    """

    stride: Triple
    origin: Triple

    def __post_init__(self) -> None:
        for name in ("stride", "origin"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"LevelGeometry.{name} must have 3 entries (z, y, x); got {tuple(v)}")
            object.__setattr__(self, name, (float(v[0]), float(v[1]), float(v[2])))
        if any(not s > 0 for s in self.stride):
            raise ValueError(f"LevelGeometry.stride must be positive; got {self.stride}")


def avg_pool_geometry(stride: Sequence[float]) -> LevelGeometry:
    """The average-pooling convention: voxel ``i`` covers ``[i·s, (i+1)·s)`` and sits at ``i·s + (s − 1)/2``."""
    s = tuple(float(x) for x in stride)
    return LevelGeometry((s[0], s[1], s[2]), ((s[0] - 1) / 2, (s[1] - 1) / 2, (s[2] - 1) / 2))


# ------------------------------------------------------------------------------------------ linearised copy
# A tensor of the copy holds one (sum, weight) channel pair per path that met in it: channel 2k is the sum of
# positions, channel 2k + 1 the number of positions summed (a residual sum adds both channels). Every stand-in
# first reduces its input to the equal-weight mean position (NaN where padding reached it), then returns the pair
# (result, 1). The two other spatial axes are one voxel wide: the input is constant along them, where every box
# window and every copy is the identity.
class _Axis:
    """Shared by the stand-ins of one copy: the spatial axis being measured (0, 1, 2 = z, y, x)."""

    def __init__(self) -> None:
        self.axis = 0


def _position(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2G, ...)`` (sum, weight) pairs → ``(B, 1, ...)``: the mean over the ``G`` paths of sum / weight."""
    if x.shape[1] % 2:
        raise ValueError(f"level_geometry: a tensor of {x.shape[1]} channels reached a layer of the linearised copy; "
                         "the network mixes channels in a way the calibration cannot follow, pass the geometry "
                         "explicitly")
    v = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
    return (v[:, :, 0] / v[:, :, 1]).mean(dim=1, keepdim=True)


def _pair(pos: torch.Tensor) -> torch.Tensor:
    return torch.cat([pos, torch.ones_like(pos)], dim=1)


def _nan_pad(x: torch.Tensor, lo: int, hi: int, dim: int) -> torch.Tensor:
    """Pad ``x`` along ``dim`` with ``lo`` / ``hi`` NaN voxels."""
    if lo <= 0 and hi <= 0:
        return x
    shape = list(x.shape)
    parts = []
    for n in (lo, hi):
        shape[dim] = max(n, 0)
        parts.append(torch.full(shape, float("nan"), dtype=x.dtype, device=x.device))
    return torch.cat([parts[0], x, parts[1]], dim=dim)


def _windows(x: torch.Tensor, dim: int, kernel: int, stride: int, dilation: int = 1, length: int = -1) -> torch.Tensor:
    """Mean over windows of ``kernel`` taps ``dilation`` apart, one every ``stride`` voxels, along ``dim``.

    ``length`` (if given) is the number of windows expected; windows past the end (ceil-mode pooling) are NaN.
    """
    span = (kernel - 1) * dilation + 1
    if length >= 0:
        x = _nan_pad(x, 0, (length - 1) * stride + span - x.shape[dim], dim)
    return x.unfold(dim, span, stride)[..., ::dilation].mean(dim=-1)


def _triple(v: object, name: str, module: nn.Module) -> Tuple[int, int, int]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
    if len(t) != 3:
        raise ValueError(f"level_geometry: {type(module).__name__} has a {len(t)}-D {name} {t}; PGL needs 3D "
                         "operations")
    return int(t[0]), int(t[1]), int(t[2])


class _BoxWindow(nn.Module):
    """The kernel, stride and dilation of a (transposed) convolution, and the axis being measured."""

    def __init__(self, conv: nn.Module, axis: _Axis):
        super().__init__()
        self.kernel = _triple(conv.kernel_size, "kernel", conv)
        self.stride = _triple(conv.stride, "stride", conv)
        self.dilation = _triple(conv.dilation, "dilation", conv)
        self.axis = axis


class _BoxConv(_BoxWindow):
    """A convolution's geometry: a box window with its kernel, stride, dilation and padding."""

    def __init__(self, conv: nn.modules.conv._ConvNd, axis: _Axis):
        super().__init__(conv, axis)
        pad = conv.padding
        if isinstance(pad, str):                                   # 'valid' / 'same' (torch's split of 'same')
            tot = [0 if pad == "valid" else d * (k - 1) for d, k in zip(self.dilation, self.kernel)]
            self.pad = [(t // 2, t - t // 2) for t in tot]
        else:
            self.pad = [(p, p) for p in _triple(pad, "padding", conv)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis.axis
        pos = _nan_pad(_position(x), *self.pad[a], dim=2 + a)
        return _pair(_windows(pos, 2 + a, self.kernel[a], self.stride[a], self.dilation[a]))


class _BoxConvTranspose(_BoxWindow):
    """A transposed convolution's geometry: every input voxel spread evenly over the outputs its kernel reaches."""

    def __init__(self, conv: nn.modules.conv._ConvTransposeNd, axis: _Axis):
        super().__init__(conv, axis)
        self.pad = _triple(conv.padding, "padding", conv)
        self.out_pad = _triple(conv.output_padding, "output_padding", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis.axis
        k, t, d, p, op = self.kernel[a], self.stride[a], self.dilation[a], self.pad[a], self.out_pad[a]
        pos = _position(x).movedim(2 + a, -1)
        n = pos.shape[-1]
        m = -(-((k - 1) * d + 1) // t)                            # NaN inputs beyond each end reach every edge output
        pos = _nan_pad(pos, m, m, pos.ndim - 1)
        full = torch.zeros(*pos.shape[:-1], (n + 2 * m - 1) * t + (k - 1) * d + 1, dtype=pos.dtype,
                           device=pos.device)
        for tap in range(k):                                       # out[i·t + tap·d] += in[i]
            full[..., tap * d: tap * d + (n + 2 * m - 1) * t + 1: t] += pos
        count = torch.zeros_like(full[..., :1].expand(full.shape).contiguous())
        for tap in range(k):
            count[..., tap * d: tap * d + (n + 2 * m - 1) * t + 1: t] += 1
        length = (n - 1) * t - 2 * p + (k - 1) * d + op + 1
        out = (full / count)[..., p + m * t: p + m * t + length]   # mean of the inputs reaching each output
        return _pair(out.movedim(-1, 2 + a))


class _BoxPool(nn.Module):
    """Average or max pooling read as average pooling over the same windows (the window's centre)."""

    def __init__(self, pool: nn.Module, axis: _Axis):
        super().__init__()
        self.kernel = _triple(getattr(pool, "kernel_size"), "kernel", pool)
        stride = getattr(pool, "stride", None)
        self.stride = self.kernel if stride is None or stride == [] else _triple(stride, "stride", pool)
        self.pad = _triple(getattr(pool, "padding", 0), "padding", pool)
        self.ceil_mode = bool(getattr(pool, "ceil_mode", False))
        if isinstance(pool, nn.modules.pooling._MaxPoolNd) and _triple(pool.dilation, "dilation", pool) != (1, 1, 1):
            raise ValueError("level_geometry: dilated max pooling is not supported; pass the geometry explicitly")
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis.axis
        pos = _position(x)
        n, k, st, p = pos.shape[2 + a], self.kernel[a], self.stride[a], self.pad[a]
        length = (n + 2 * p - k + (st - 1 if self.ceil_mode else 0)) // st + 1
        if self.ceil_mode and (length - 1) * st >= n + p:         # torch: the last window must start inside
            length -= 1
        return _pair(_windows(_nan_pad(pos, p, p, 2 + a), 2 + a, k, st, length=length))


def _stand_in(m: nn.Module, axis: _Axis, where: str) -> Optional[nn.Module]:
    """The linearised stand-in of module ``m``, or None to keep it (a container) and look inside."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return _BoxConvTranspose(m, axis)
    if isinstance(m, nn.modules.conv._ConvNd):
        return _BoxConv(m, axis)
    if isinstance(m, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)):
        return _BoxPool(m, axis)
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.dropout._DropoutNd,
                      nn.Identity)):
        return nn.Identity()
    if type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention):
        return nn.Identity()
    if any(True for _ in m.parameters(recurse=False)) or isinstance(
            m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Linear,
                nn.MultiheadAttention, nn.Upsample)):
        raise ValueError(f"level_geometry cannot linearise {where} ({type(m).__name__}): calibration knows "
                         "convolutions, transposed convolutions, pooling, normalisation, nonlinearities and "
                         "dropout. Pass the geometry explicitly (a list of LevelGeometry, e.g. "
                         "avg_pool_geometry(stride) per level)")
    return None


def linearised_copy(module: nn.Module) -> Tuple[nn.Module, _Axis]:
    """A copy of ``module`` whose layers are replaced by their geometric stand-ins (see the comment above them).

    The original is untouched and no parameter is copied (the stand-ins have none). Containers, residual additions,
    concatenations and custom ``forward`` logic are kept. Returns the copy and the object whose ``axis`` selects
    the spatial axis the copy measures.
    """
    memo: Dict[int, object] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    lin = copy.deepcopy(module, memo)
    axis = _Axis()
    done: Dict[int, nn.Module] = {}
    names: Dict[int, str] = {}
    for n, m in lin.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n or type(lin).__name__)                  # the first name of a shared module

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in done:
                parent._modules[name] = done[id(child)]
                continue
            new = _stand_in(child, axis, names.get(id(child), name))
            if new is None:
                done[id(child)] = child
                visit(child)
            else:
                done[id(child)] = new
                parent._modules[name] = new

    visit(lin)
    if any(True for _ in lin.parameters()):
        raise ValueError("level_geometry: parameters are left in the linearised copy; pass the geometry explicitly")
    return lin.eval(), axis


# ---------------------------------------------------------------------------------------------- calibration
def calibrate(forward: Callable[[torch.Tensor], Sequence[torch.Tensor]], axis: _Axis,
              strides: Sequence[Sequence[int]], exact: Sequence[bool]) -> List[LevelGeometry]:
    """Measure the geometry of each output of ``forward`` (a linearised copy's computation of its levels).

    Per axis, ``forward`` runs on a float64 input that is long along that axis and one voxel wide along the others,
    holding the view coordinate; the input is lengthened until every output has at least three voxels untouched by
    padding. Per output, ``origin`` is the midpoint of ``position − i·stride`` over those voxels.

    Args:
        forward: maps the input ``(1, 2, Z, Y, X)`` (a (sum, weight) pair) to the list of outputs.
        axis: the copy's axis selector (from :func:`linearised_copy`).
        strides: total stride of each output, in view voxels.
        exact: per output, whether it must be linear (``origin + i·stride`` within :data:`LINEARITY_TOL`); the
            others may ripple by up to :data:`RIPPLE_TOL` of their stride.

    Raises:
        ValueError: a response that is not ``origin + i·stride`` within those tolerances (the network is not
            linear after linearisation, or its strides differ from ``strides``), or a receptive field longer than
            :data:`MAX_CALIBRATION_LENGTH`.
    """
    n = len(strides)
    origins = [[0.0, 0.0, 0.0] for _ in range(n)]
    for ax in range(3):
        axis.axis = ax
        length = 4 * int(strides[-1][ax])
        while True:
            ramp = torch.arange(length, dtype=torch.float64).view([length if d == ax else 1 for d in range(3)])
            with torch.no_grad():
                outs = forward(_pair(ramp[None, None]))
            if not isinstance(outs, (list, tuple)) or len(outs) != n:
                raise ValueError(f"level_geometry: the network returned {type(outs).__name__} instead of its {n} "
                                 "levels (build the encoder with return_skips=True)")
            lines = [_position(o).reshape(-1) for o in outs]
            if all(int(torch.isfinite(r).sum()) >= 3 for r in lines):
                break
            length *= 2
            if length > MAX_CALIBRATION_LENGTH:
                raise ValueError(f"level_geometry: no voxel of some level is free of padding along axis {ax} "
                                 f"even for an input of {length // 2} voxels; pass the geometry explicitly")
        for lvl, r in enumerate(lines):
            s = float(strides[lvl][ax])
            idx = torch.nonzero(torch.isfinite(r)).flatten()
            resid = r[idx] - s * idx.to(torch.float64)
            lo, hi = float(resid.min()), float(resid.max())
            tol = LINEARITY_TOL * max(1.0, s) if exact[lvl] else RIPPLE_TOL * s
            if (hi - lo) / 2 > tol:
                raise ValueError(f"level_geometry: level {lvl} does not respond as origin + i·stride along axis {ax} "
                                 f"(stride {s:g}; deviations up to ±{(hi - lo) / 2:.3g} voxels): the network is not "
                                 "linear after linearisation or its strides differ from the plans; pass the geometry "
                                 "explicitly")
            origins[lvl][ax] = round((lo + hi) / 2, 9) + 0.0
    return [LevelGeometry((float(strides[lvl][0]), float(strides[lvl][1]), float(strides[lvl][2])),
                          (origins[lvl][0], origins[lvl][1], origins[lvl][2])) for lvl in range(n)]


def level_geometry(network: nn.Module, *, encoder: bool = False) -> List[LevelGeometry]:
    """Geometry of each feature level 0 (full resolution) … n − 1 (bottleneck) of a U-Net, measured.

    Calibrated on a linearised copy (module docstring; the network is not modified and nothing is copied to its
    device; ~0.1–0.5 s on a CPU).

    Results for dynamic-network-architectures' U-Nets (per axis; ``s`` the level's total stride, ``S``/``t`` a
    decoder level's stride and its ratio to the level below): encoder levels of ``PlainConvUNet`` ``origin = 0``
    (the alignment of a linearised network is exact to float precision), of ``ResidualEncoderUNet``
    ``(s − 1)/4``, the midpoint between its convolution path (``0``) and its average-pool shortcut
    (``(s − 1)/2``); decoder levels the midpoint between the skip and the upsampled level below,
    ``(origin_skip + origin_below)/2 − S·(t − 1)/4`` (``PlainConvUNet`` of the 3d_fullres plans: ``−S/4`` at the
    level above the bottleneck, e.g. ``(−1, −2, −2)`` at stride ``(4, 8, 8)``). ``BENCHMARKS.md`` ("Feature
    geometry") gives the misalignment that remains for each.

    Args:
        network: a ``PlainConvUNet`` / ``ResidualEncoderUNet`` (or any U-Net that
            :func:`~nnunet_pgl.features.extract_features` reads); DDP / ``torch.compile`` wrappers are stripped.
        encoder: the geometry of the encoder's stage outputs (the skips) instead of the levels as
            :func:`~nnunet_pgl.features.extract_features` returns them (decoder outputs, bottleneck last).

    Returns:
        ``[LevelGeometry(stride, origin), …]``, one per level; ``stride`` equals ``level_strides(network)``.

    Raises:
        ValueError: not such a U-Net, or a network the calibration cannot read (then pass the geometry explicitly
            to :class:`~nnunet_pgl.model.PGLBranch` / :func:`~nnunet_pgl.alignment.align_features`).
    """
    net = unwrap_network(network)
    check_unet(net)
    strides = level_strides(net)
    n = len(strides)
    if encoder:
        lin_enc, axis = linearised_copy(unet_parts(net)[0])
        return calibrate(lin_enc, axis, strides, [True] * n)
    lin, axis = linearised_copy(net)
    return calibrate(lambda x: extract_features(lin, x, list(range(n))), axis, strides,
                     [lvl == n - 1 for lvl in range(n)])
