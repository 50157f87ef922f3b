"""Device discipline without a GPU: pretraining with the training state on a device other than the CPU.

CI machines have no GPU, and on a CPU every tensor mixes with every other, so code that creates a tensor on the CPU
and combines it with the training state (or calls ``.numpy()`` on a device tensor) passes every CPU test and
fails on the first CUDA run. Here the pretrainer runs on the stand-in accelerator of ``simdevice.py`` (tensors on
``meta`` that hold real values and refuse to mix with CPU tensors as CUDA does): train steps, the epoch-end
statistics, the log record and lines, the feature pictures, checkpoint writing and ``--c``. With a CUDA GPU the
same tests also run on it.
"""
from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Iterator, List

import numpy as np
import pytest
import torch

from simdevice import SimDevice, SimTensor
from tiny_pretrain import DATASET, load_checkpoint, log_lines, output_folder, tiny  # noqa: F401 (fixture)

from nnunet_pgl.pretraining.config import PretrainConfig
from nnunet_pgl.pretraining.pictures import pca_rgb

# loading host weights into parameters that report the meta device makes torch warn (the stand-in copies them)
pytestmark = pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")

DEVICES = ["stand-in", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs CUDA"))]
TRAINERS = {"pgl": "nnUNetPretrainerPGL", "byol": "nnUNetPretrainerBYOL", "pgl+byol": "nnUNetPretrainerPGLBYOL"}


@contextlib.contextmanager
def on(device: str) -> Iterator[Any]:
    """``(torch.device, SimDevice or None)`` with the stand-in active for ``'stand-in'``."""
    if device == "stand-in":
        with SimDevice() as sim:
            yield torch.device("meta"), sim
    else:
        yield torch.device(device), None


def make_trainer(root, method: str, device: torch.device, continue_training: bool = False):
    from nnunet_pgl.pretraining import pretrainer
    pre = root / "pre" / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = continue_training
    cls = getattr(pretrainer, TRAINERS[method])
    return cls(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()), device)


def use_config(root, monkeypatch, **kw: Any) -> None:
    """The run's configuration (``nnUNet_pgl_config``); the probe only where asked (it is slow on the stand-in)."""
    path = root / "pgl_config_in.json"
    PretrainConfig(num_workers=0, **{"probe": False, **kw}).save(str(path))
    monkeypatch.setenv("nnUNet_pgl_config", str(path))


def tensors(obj: Any) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


# --------------------------------------------------------------------------------------- the stand-in itself
def test_stand_in_refuses_what_a_gpu_refuses():
    with SimDevice() as sim:
        x = torch.arange(6.0, device="meta").view(2, 3)
        assert isinstance(x, SimTensor) and x.device.type == "meta"
        y = (x * 2 + torch.tensor(1.0)).sum(0)  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert torch.equal(y.cpu(), torch.tensor([8.0, 12.0, 16.0])) and sim.host_copies == 1
        for bad in (lambda: torch.cat([y, torch.zeros(0)]),     # the defect of issue 11, item 1
                    lambda: y + torch.ones(3),
                    lambda: torch.stack([y.sum(), torch.tensor(1.0)]),
                    lambda: torch.nn.functional.linear(torch.ones(1, 3), x)):
            with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
                bad()
        with pytest.raises(TypeError, match="numpy"):
            y.numpy()
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(y)
        with pytest.raises(RuntimeError, match="torch.save"):
            torch.save({"w": y}, io.BytesIO())
        assert y.tolist() == [8.0, 12.0, 16.0] and float(y[0]) == 8.0 and sim.syncs == 2
        g = torch.Generator(device="meta").manual_seed(0)
        r = torch.rand(4, generator=g, device=g.device)
        assert isinstance(r, SimTensor)
        assert torch.equal(r.cpu(), torch.rand(4, generator=torch.Generator().manual_seed(0)))
        y[[0, 2]] = 0.0  # list indices become CPU index tensors, which CUDA accepts too
        assert y.cpu().tolist() == [0.0, 12.0, 0.0]


def test_pca_rgb_of_device_features():
    feats = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    ref = pca_rgb(feats)
    with SimDevice():
        out = pca_rgb(feats.to("meta"))
    assert isinstance(out, np.ndarray) and out.shape == (2, 6, 7, 3)
    np.testing.assert_array_equal(out, ref)


# --------------------------------------------------------------------------------------- the pretrainer on it
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["pgl", "byol", "pgl+byol"])
def test_pretraining_epoch_on_a_non_cpu_device(tiny, monkeypatch, method, device):
    """One epoch of 2 steps: the epoch statistics equal the means of the step losses and reach the host in one copy;
    the log record and lines, the pictures and both checkpoints are written; every checkpoint tensor is on the CPU."""
    use_config(tiny, monkeypatch, epochs=1, iters_per_epoch=2, save_every=1, probe=method == "pgl")
    torch.set_num_threads(1)  # the tiny network gains nothing from threads; the fixture restores the count
    seen: List[Any] = []
    with on(device) as (dev, sim):
        t = make_trainer(tiny, method, dev)
        real_epoch_end = t.on_train_epoch_end

        def epoch_end(outputs: List[dict]) -> None:
            st = t._epoch_stats
            per_step = st["losses"] + st["global"] + [v for v in st["levels"] if v is not None]
            assert all(x.device == t.device for x in per_step)
            steps = [float(x) for x in st["losses"]]
            levels = [v.double().cpu().tolist() for v in st["levels"] if v is not None]
            glob = [float(x) for x in st["global"]]
            before = (sim.host_copies, sim.syncs) if sim else None
            real_epoch_end(outputs)
            seen.append((steps, levels, glob, before and (sim.host_copies - before[0], sim.syncs - before[1])))

        t.on_train_epoch_end = epoch_end
        t.run_training()
    out = output_folder(tiny, TRAINERS[method])
    (steps, levels, glob, transfers), = seen
    assert len(steps) == 2
    if sim is not None:
        assert transfers == (1, 0)  # one device→host copy of the epoch's sums, no other synchronisation
    rec, = json.loads((out / "pgl_log.json").read_text())
    assert rec["loss"] == pytest.approx(np.mean(steps), rel=1e-6)
    assert (method == "byol") == (not levels) and ("byol" in method) == bool(glob)
    assert rec["level_losses"] == (pytest.approx(list(np.mean(levels, 0)), rel=1e-6) if levels else [])
    assert rec["global_loss"] == (pytest.approx(np.mean(glob), rel=1e-6) if glob else None)
    text = "\n".join(log_lines(out))
    assert f"loss {rec['loss']:.4f}" in text and "could not write the feature picture" not in text
    assert (out / "pictures" / "epoch_0000.png").stat().st_size > 0
    ck = load_checkpoint(out / "checkpoint_final.pth")
    ts = tensors(ck)
    assert ts and all(type(x) is torch.Tensor and x.device.type == "cpu" for x in ts)
    assert tensors(ck["optimizer_state"])  # the momentum buffers are there, as host copies


@pytest.mark.parametrize("device", DEVICES)
def test_resume_on_a_non_cpu_device(tiny, monkeypatch, device):
    """A checkpoint written on the device resumes there (--c): weights, heads, target and optimizer state go back to
    the device, and training continues at the saved epoch."""
    use_config(tiny, monkeypatch, epochs=1, iters_per_epoch=1, save_every=1)
    torch.set_num_threads(1)
    from nnunetv2.run.run_training import maybe_load_checkpoint
    with on(device) as (dev, sim):
        make_trainer(tiny, "pgl", dev).run_training()
        use_config(tiny, monkeypatch, epochs=2, iters_per_epoch=1, save_every=1)
        t = make_trainer(tiny, "pgl", dev, continue_training=True)
        maybe_load_checkpoint(t, True, False)
        assert t.current_epoch == 1
        for p in list(t.online.parameters()) + list(t.target.parameters()):
            assert p.device == t.device
        for state in t.optimizer.state.values():
            assert all(v.device == t.device for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        t.run_training()
    out = output_folder(tiny)
    assert [r["epoch"] for r in json.loads((out / "pgl_log.json").read_text())] == [0, 1]
    assert load_checkpoint(out / "checkpoint_final.pth")["current_epoch"] == 2
    assert "could not write the feature picture" not in "\n".join(log_lines(out))
    assert (out / "pictures" / "epoch_0001.png").is_file()
