"""A stand-in accelerator for CPU-only test runs: tensors that report the ``meta`` device but hold real CPU values.

Code written for a GPU must create every tensor on its inputs' device and copy to the host explicitly. On a CPU-only
machine that discipline is never exercised: CPU tensors mix freely with CPU tensors. Inside ``with SimDevice() as
sim:`` the device ``meta`` behaves like an accelerator whose tensors (:class:`SimTensor`) carry real values:

* factory calls with ``device='meta'`` (``torch.zeros``, ``torch.tensor``, ``torch.rand``, ...), ``.to('meta')`` and
  ``module.to('meta')`` create :class:`SimTensor` s; every op on them computes on the CPU and wraps the result;
* an op whose tensor arguments mix the stand-in and the CPU raises ``RuntimeError: Expected all tensors to be on
  the same device`` as CUDA does. As on CUDA, the exceptions are 0-dim CPU tensors (CPU scalars; not in ``cat`` /
  ``stack``) and the explicit copies (``.to()``, ``.cpu()``, ``copy_``); indexing (``index``, ``index_put``) takes
  CPU tensors as CUDA takes CPU index tensors (more leniently: CPU values pass too);
* ``.numpy()`` (and so ``np.asarray``) on a :class:`SimTensor` raises as on CUDA; ``.cpu()`` / ``.to('cpu')`` return
  plain CPU tensors (counted in ``sim.host_copies``); ``.item()``, ``float()``, ``.tolist()`` work (counted in
  ``sim.syncs``), as they do on CUDA (a synchronisation);
* ``torch.Generator(device='meta')`` makes a generator that reports the ``meta`` device (CPU state underneath).
  Limitation: a plain CPU generator passed to a stand-in random op is not detected (dispatch loses its identity);
* ``torch.save`` of a :class:`SimTensor` fails (a checkpoint must hold host tensors);
* ``torch.autocast('meta', ...)`` acts as ``torch.autocast('cpu', ...)`` (torch has no autocast for ``meta``).

Dispatch level only: what reads a tensor's memory outside torch's op dispatch (e.g. the collectives of
``torch.distributed``) is not simulated.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

SIM = torch.device("meta")
_aten = torch.ops.aten
#: ops that may take CPU and stand-in tensors together, as on CUDA (explicit copies; CPU indices in indexing)
_CROSS_DEVICE_OK = {_aten._to_copy.default, _aten.copy_.default, _aten.index.Tensor, _aten.index_put_.default,
                    _aten.index_put.default, _aten._index_put_impl_.default, _aten.copy.default}
#: ops where even a 0-dim CPU tensor may not join stand-in tensors (CUDA refuses them too)
_NO_CPU_SCALARS = {_aten.cat.default, _aten.stack.default}


class SimTensor(torch.Tensor):
    """A tensor on the stand-in device: reports ``meta``, holds its values in ``self.inner`` (a CPU tensor)."""

    inner: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "SimTensor":
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=SIM, requires_grad=False)
        r.inner = inner
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor({self.inner!r})"

    def __deepcopy__(self, memo: Dict[int, Any]) -> "SimTensor":
        out = SimTensor(copy.deepcopy(self.inner, memo))
        if self.requires_grad:
            out.requires_grad_(True)
        if getattr(self, "_is_param", False):
            out._is_param = True
        memo[id(self)] = out
        return out

    def numpy(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        raise TypeError("can't convert meta device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
                        "memory first. (stand-in device: this would fail on a GPU)")

    def __array__(self, *args: Any, **kwargs: Any):
        return self.numpy()

    def tolist(self):  # type: ignore[override]
        if _ACTIVE:
            _ACTIVE[-1].syncs += 1
        return self.inner.tolist()

    def __reduce_ex__(self, proto: Any):  # type: ignore[override]
        raise RuntimeError("torch.save of a tensor on the stand-in device: move it to the CPU first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only reached outside SimDevice
        raise RuntimeError(f"{func} on a stand-in device tensor outside `with SimDevice()`")


_ACTIVE: list = []
_RealGenerator = torch.Generator
_real_autocast_init = torch.amp.autocast_mode.autocast.__init__


def _autocast_init(self: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
    _real_autocast_init(self, "cpu" if device_type == "meta" else device_type, *args, **kwargs)


class SimGenerator(_RealGenerator):
    """``torch.Generator(device='meta')`` inside :class:`SimDevice`: CPU state, reports the stand-in device."""

    def __new__(cls, device: Any = None):
        if device is not None and torch.device(device) == SIM:
            return _RealGenerator.__new__(cls, device="cpu")
        return _RealGenerator(device) if device is not None else _RealGenerator()

    def __init__(self, device: Any = None):
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return SIM


def _is_sim_device(d: Any) -> bool:
    return d is not None and torch.device(d).type == "meta"


def _lists_to_cpu_indices(idx: Any) -> Any:
    if isinstance(idx, list):
        return torch.tensor(idx)
    if isinstance(idx, tuple):
        return tuple(_lists_to_cpu_indices(i) for i in idx)
    return idx


class _FunctionMode(TorchFunctionMode):
    """What builds tensors on the stand-in without dispatch: ``torch.tensor`` / ``as_tensor`` / ``asarray`` with
    ``device='meta'``, and the index tensors that indexing makes of Python lists (made CPU index tensors here,
    which CUDA accepts as well)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_sim_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            return func(*args, **kwargs).to(SIM)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], SimTensor):
            args = (args[0], _lists_to_cpu_indices(args[1]), *args[2:])
        return func(*args, **kwargs)


class _DispatchMode(TorchDispatchMode):
    def __init__(self, owner: "SimDevice"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrappers: Dict[int, SimTensor] = {}
        kinds = set()  # 'sim', 'cpu' (non-scalar), 'cpu0' (0-dim CPU)

        def unwrap(x: Any) -> Any:
            if isinstance(x, SimTensor):
                kinds.add("sim")
                wrappers[id(x.inner)] = x
                return x.inner
            if isinstance(x, torch.Tensor):
                if x.device.type == "meta":
                    raise RuntimeError(f"{func}: a plain meta tensor (no values) reached the stand-in device; it was "
                                       "created outside `with SimDevice()`")
                kinds.add("cpu" if x.dim() > 0 else "cpu0")
            return x

        a, k = tree_map(unwrap, (tuple(args), dict(kwargs)))
        target = k.get("device")
        to_sim = _is_sim_device(target) or (target is None and "sim" in kinds)
        if _is_sim_device(target):
            k["device"] = torch.device("cpu")
        if "sim" in kinds and func not in _CROSS_DEVICE_OK:
            if "cpu" in kinds or ("cpu0" in kinds and func in _NO_CPU_SCALARS):
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"meta (the stand-in accelerator) and cpu! ({func})")
        if func is _aten._to_copy.default and "sim" in kinds and target is not None and not to_sim:
            self.owner.host_copies += 1
        if func is _aten._local_scalar_dense.default and "sim" in kinds:
            self.owner.syncs += 1
        out = func(*a, **k)
        if func is _aten.copy_.default:  # copy_ writes into its first argument, wherever it lives
            return args[0]
        if not to_sim:
            return out

        def wrap(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor):
                w = wrappers.get(id(x))  # in-place / out= ops return their own argument
                return w if w is not None else SimTensor(x)
            return x

        return tree_map(wrap, out)


class SimDevice:
    """Context manager: inside it, ``meta`` is a stand-in accelerator (see the module docstring)."""

    def __init__(self) -> None:
        self.host_copies = 0
        self.syncs = 0
        self._modes: Optional[tuple] = None

    def __enter__(self) -> "SimDevice":
        self._modes = (_FunctionMode(), _DispatchMode(self))
        for m in self._modes:
            m.__enter__()
        _ACTIVE.append(self)
        torch.Generator = SimGenerator  # type: ignore[misc]
        torch.amp.autocast_mode.autocast.__init__ = _autocast_init  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.amp.autocast_mode.autocast.__init__ = _real_autocast_init  # type: ignore[method-assign]
        torch.Generator = _RealGenerator  # type: ignore[misc]
        _ACTIVE.pop()
        assert self._modes is not None
        for m in reversed(self._modes):
            m.__exit__(*exc)
