"""Tests of ``nnunet_pgl.pretraining.ingest`` on real nnU-Net plans (tests/data) and small synthetic CT volumes."""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_pgl.pretraining import ingest
from nnunet_pgl.pretraining.ingest import discovery, integrity, preprocessing
from nnunet_pgl.pretraining.contract import sha256_of_files
from nnunet_pgl.pretraining.ingest import (IngestError, IngestWarning, UnlabeledCase, ingest_unlabeled,
                                           unlabeled_folder)
from nnunet_pgl.demo.synthetic import make_case

SHAPE = (16, 32, 32)
SPACING = (2.5, 1.0, 1.0)  # z, y, x (the plans' 3d_fullres spacing)


@pytest.fixture(autouse=True)
def nnunet_env(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("nnunet_env")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(root / name))


@pytest.fixture
def plans_dict(data_dir):
    with open(data_dir / "plans_plain.json") as f:
        return json.load(f)


@pytest.fixture
def dataset_json(data_dir):
    with open(data_dir / "dataset.json") as f:
        return json.load(f)


def managers(plans: dict, configuration: str = "3d_fullres"):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(copy.deepcopy(plans))
    return pm, pm.get_configuration(configuration)


@pytest.fixture
def pm_cm(plans_dict):
    return managers(plans_dict)


@pytest.fixture
def base(tmp_path) -> str:
    b = tmp_path / "preprocessed" / "Dataset990_PGLSynth"
    (b / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    return str(b)


def write_image(arr: np.ndarray, path: Path, spacing: Sequence[float] = SPACING) -> str:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK: (x, y, z)
    sitk.WriteImage(im, str(path))
    return str(path)


def ct(seed: int, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    return make_case(shape=shape, spacing=spacing, rng=np.random.default_rng(seed))[0]


def run(dirs, pm_cm, dataset_json, base, **kw):
    pm, cm = pm_cm
    kw.setdefault("num_processes", 1)
    kw.setdefault("verbose", False)
    return ingest_unlabeled([str(d) for d in dirs], pm, cm, dataset_json, base, **kw)


def load_b2nd(path: str) -> np.ndarray:
    return blosc2.open(urlpath=path, mode="r")[:]


def read_index(base: str) -> list:
    with open(os.path.join(unlabeled_folder(base, "nnUNetPlans_3d_fullres"), "index.json")) as f:
        return json.load(f)


def folder_files(base: str) -> set:
    return set(os.listdir(unlabeled_folder(base, "nnUNetPlans_3d_fullres")))


@pytest.fixture
def count_calls(monkeypatch):
    """Count worker calls (in-process runs only): ``counts['preprocess']``, ``counts['hash']``."""
    counts = {"preprocess": 0, "hash": 0}
    real_pre, real_hash = preprocessing.preprocess_case, integrity.hash_and_check

    def pre(*a, **k):
        counts["preprocess"] += 1
        return real_pre(*a, **k)

    def hsh(*a, **k):
        counts["hash"] += 1
        return real_hash(*a, **k)

    monkeypatch.setattr(preprocessing, "preprocess_case", pre)
    monkeypatch.setattr(integrity, "hash_and_check", hsh)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# layout and equivalence with nnU-Net's own preprocessing
# ---------------------------------------------------------------------------------------------------------------

def test_unlabeled_folder_is_sibling_of_preprocessed_data(base):
    f = unlabeled_folder(base, "nnUNetPlans_3d_fullres")
    assert os.path.dirname(f) == base
    assert f != os.path.join(base, "nnUNetPlans_3d_fullres")
    assert not f.startswith(os.path.join(base, "nnUNetPlans_3d_fullres") + os.sep)


def test_nifti_and_nrrd_match_default_preprocessor(tmp_path, pm_cm, dataset_json, base):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pm, cm = pm_cm
    src = tmp_path / "unl"
    src.mkdir()
    nii = write_image(ct(0), src / "a.nii.gz")
    # another spacing: the case must be resampled to the plans' spacing (2.5, 1, 1)
    nrrd = write_image(ct(1, shape=(12, 24, 28)), src / "b.nrrd", spacing=(3.0, 1.25, 1.1))
    cases = run([src], pm_cm, dataset_json, base)

    assert [c.source for c in cases] == [(nii,), (nrrd,)]
    for c, f in zip(cases, (nii, nrrd)):
        assert isinstance(c, UnlabeledCase)
        assert c.sha256 == hashlib.sha256(Path(f).read_bytes()).hexdigest()
        assert c.case_id == "unl_" + c.sha256[:16]
        assert c.data_file == os.path.join(unlabeled_folder(base, cm.data_identifier), c.case_id + ".b2nd")
        ref, ref_seg, ref_props = DefaultPreprocessor(verbose=False).run_case([f], None, pm, cm, dataset_json)
        got = load_b2nd(c.data_file)
        assert got.dtype == np.float32 and got.ndim == 4 and got.shape[0] == 1
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(load_b2nd(c.data_file[:-5] + "_seg.b2nd"), ref_seg.astype(np.int16))
        with open(c.data_file[:-5] + ".pkl", "rb") as fh:
            props = pickle.load(fh)
        assert props["class_locations"] == {}
        for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                    "shape_after_cropping_and_before_resampling"):
            assert np.array_equal(np.asarray(props[key], dtype=object), np.asarray(ref_props[key], dtype=object))
    # resampled to the plans' spacing: 12 * 3.0 / 2.5, 24 * 1.25, 28 * 1.1 (rounded)
    assert load_b2nd(cases[1].data_file).shape == (1, 14, 30, 31)

    # index and the stock loader
    index = read_index(base)
    assert [e["case_id"] for e in index] == [c.case_id for c in cases]
    assert index[0]["source"] == [nii] and index[0]["sha256"] == cases[0].sha256
    assert index[0]["files"][0]["size"] == os.path.getsize(nii)
    assert index[0]["plans_fingerprint"] == ingest.plans_fingerprint(pm, cm)
    ds = nnUNetDatasetBlosc2(unlabeled_folder(base, cm.data_identifier))
    assert sorted(ds.identifiers) == sorted(c.case_id for c in cases)
    data, seg, _, props = ds.load_case(cases[0].case_id)
    assert data.shape[1:] == seg.shape[1:] and props["class_locations"] == {}
    # nothing written into nnU-Net's own folder, no temporary files left
    assert os.listdir(os.path.join(base, "nnUNetPlans_3d_fullres")) == []
    assert not [n for n in folder_files(base) if n.startswith(".pgltmp")]


def test_nibabel_dataset_reads_nifti_with_nibabel_and_nrrd_with_simpleitk(tmp_path, plans_dict, dataset_json, base):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    nib_plans = dict(plans_dict, image_reader_writer="NibabelIO")
    pm_nib, cm_nib = managers(nib_plans)
    pm_sitk, cm_sitk = managers(plans_dict)
    src = tmp_path / "unl"
    src.mkdir()
    nii = write_image(ct(2), src / "a.nii.gz")
    nrrd = write_image(ct(3), src / "b.nrrd")
    assert preprocessing.reader_class_for([nii], pm_nib.image_reader_writer_class).__name__ == "NibabelIO"
    assert preprocessing.reader_class_for([nrrd], pm_nib.image_reader_writer_class).__name__ == "SimpleITKIO"
    cases = run([src], (pm_nib, cm_nib), dataset_json, base)
    ref_nii = DefaultPreprocessor(verbose=False).run_case([nii], None, pm_nib, cm_nib, dataset_json)[0]
    ref_nrrd = DefaultPreprocessor(verbose=False).run_case([nrrd], None, pm_sitk, cm_sitk, dataset_json)[0]
    np.testing.assert_array_equal(load_b2nd(cases[0].data_file), ref_nii)
    np.testing.assert_array_equal(load_b2nd(cases[1].data_file), ref_nrrd)


# ---------------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------------

def test_second_call_redoes_nothing(tmp_path, pm_cm, dataset_json, base, count_calls):
    src = tmp_path / "unl"
    src.mkdir()
    for i in range(3):
        write_image(ct(10 + i), src / f"c{i}.nii.gz")
    first = run([src], pm_cm, dataset_json, base)
    assert count_calls == {"preprocess": 3, "hash": 3}
    folder = unlabeled_folder(base, "nnUNetPlans_3d_fullres")
    mtimes = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n != ".ingest.lock"}
    second = run([src], pm_cm, dataset_json, base)
    assert second == first
    assert count_calls == {"preprocess": 3, "hash": 3}  # neither preprocessed nor even re-hashed
    assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in mtimes} == mtimes


def forbid_image_reads(monkeypatch, src: Path) -> dict:
    """Make every way ingestion reads a source file fail: the header probe, hashing, preprocessing, SimpleITK itself
    and Python's ``open`` of anything under ``src`` (also the companion lookup in ``.mhd`` headers). Returns the
    paths of attempted reads (each attempt also raises)."""
    import builtins
    tried = {"paths": []}

    def refuse(what):
        def f(*a, **k):
            tried["paths"].append((what, a[0] if a else None))
            raise AssertionError(f"{what} read a source file on a cached re-run: {a[:1]}")
        return f

    for module, name in ((discovery, "probe"), (integrity, "hash_and_check"), (preprocessing, "preprocess_case")):
        monkeypatch.setattr(module, name, refuse(name))  # (.mhd headers: caught by ``open``)
    monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", refuse("SimpleITK"))
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", refuse("SimpleITK"))
    monkeypatch.setattr(sitk, "ReadImage", refuse("SimpleITK"))
    real_open = builtins.open

    def guarded_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(str(src) + os.sep):
            return refuse("open")(file)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    return tried


def test_cached_rerun_reads_no_image_file(tmp_path, pm_cm, dataset_json, base, monkeypatch):
    """Everything cached and unchanged: the re-run trusts (path, size, mtime_ns) and opens no source file at all
    (no header probe either); a touched file is probed and hashed again, alone."""
    src = tmp_path / "unl"
    src.mkdir()
    write_image(ct(30), src / "a.nii.gz")
    write_image(ct(31), src / "b.nrrd")
    mhd = write_image(ct(32), src / "c.mhd")  # + c.raw, hashed with it
    (src / "a_copy.nii.gz").write_bytes((src / "a.nii.gz").read_bytes())  # a duplicate
    first = run([src], pm_cm, dataset_json, base)
    assert len(first) == 3
    with monkeypatch.context() as m:
        tried = forbid_image_reads(m, src)
        assert run([src], pm_cm, dataset_json, base) == first
        assert tried["paths"] == []

    st = os.stat(mhd)
    os.utime(mhd, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    probed, hashed = [], []
    real_probe, real_hash = discovery.probe, integrity.hash_and_check
    monkeypatch.setattr(discovery, "probe", lambda p: probed.append(p) or real_probe(p))
    monkeypatch.setattr(integrity, "hash_and_check", lambda paths, *a, **k: hashed.append(tuple(paths))
                        or real_hash(paths, *a, **k))
    assert run([src], pm_cm, dataset_json, base) == first
    assert probed == [mhd] and hashed == [(mhd, str(src / "c.raw"))]


def test_cached_multichannel_rerun_reads_no_image_file(tmp_path, two_channel, base, monkeypatch):
    """Multi-channel: the indexed, unchanged channel tuple is not probed again; a replaced channel file is, and
    its case is checked again (here: another size, an error naming both files)."""
    (pm, cm), dj = two_channel
    src = tmp_path / "unl"
    src.mkdir()
    files = [write_image(ct(110 + c), src / f"pat1_{c:04d}.nii.gz") for c in range(2)]
    first = run([src], (pm, cm), dj, base)
    with monkeypatch.context() as m:
        tried = forbid_image_reads(m, src)
        assert run([src], (pm, cm), dj, base) == first
        assert tried["paths"] == []
    write_image(ct(112, shape=(16, 32, 30)), Path(files[1]))
    with pytest.raises(IngestError, match=r"pat1.*differ in size or spacing.*pat1_0000.*pat1_0001"):
        run([src], (pm, cm), dj, base)


def test_touched_file_is_rehashed_changed_file_is_redone(tmp_path, pm_cm, dataset_json, base, count_calls):
    src = tmp_path / "unl"
    src.mkdir()
    paths = [write_image(ct(20 + i), src / f"c{i}.nii.gz") for i in range(3)]
    first = run([src], pm_cm, dataset_json, base)
    kept_mtime = os.stat(first[2].data_file).st_mtime_ns

    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert run([src], pm_cm, dataset_json, base) == first
    assert count_calls == {"preprocess": 3, "hash": 4}  # re-hashed, found unchanged, not redone
    assert read_index(base)[0]["files"][0]["mtime_ns"] == st.st_mtime_ns + 10**9

    write_image(ct(99), src / "c1.nii.gz")  # new content under the same name
    third = run([src], pm_cm, dataset_json, base)
    assert count_calls == {"preprocess": 4, "hash": 5}  # only c1
    assert third[0] == first[0] and third[2] == first[2] and third[1].case_id != first[1].case_id
    assert os.stat(third[2].data_file).st_mtime_ns == kept_mtime
    assert not os.path.exists(first[1].data_file)  # the replaced content's case left the folder
    assert [e["case_id"] for e in read_index(base)] == [c.case_id for c in third]


def test_mhd_hash_covers_its_raw_file(tmp_path, pm_cm, dataset_json, base, count_calls):
    src = tmp_path / "unl"
    src.mkdir()
    mhd = write_image(ct(25), src / "a.mhd")
    raw = str(src / "a.raw")
    assert os.path.isfile(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .raw file is part of the .mhd, not a skipped file
        first = run([src], pm_cm, dataset_json, base)
    assert first[0].source == (mhd,) and first[0].sha256 == sha256_of_files([mhd, raw])
    data = bytearray(Path(raw).read_bytes())
    data[:4] = b"\x00\x00\x80\x3f"  # change one voxel, same header and size
    Path(raw).write_bytes(bytes(data))
    second = run([src], pm_cm, dataset_json, base)
    assert count_calls["preprocess"] == 2 and second[0].case_id != first[0].case_id


def test_corrupt_index_is_rebuilt(tmp_path, pm_cm, dataset_json, base, count_calls):
    src = tmp_path / "unl"
    src.mkdir()
    write_image(ct(26), src / "a.nii.gz")
    first = run([src], pm_cm, dataset_json, base)
    index = os.path.join(unlabeled_folder(base, "nnUNetPlans_3d_fullres"), "index.json")
    Path(index).write_text("[{\"half\": ")
    with pytest.warns(IngestWarning, match="index.json is unreadable"):
        assert run([src], pm_cm, dataset_json, base) == first
    assert count_calls["preprocess"] == 2 and read_index(base)[0]["case_id"] == first[0].case_id


def test_plans_change_redoes_everything(tmp_path, plans_dict, dataset_json, base, count_calls):
    src = tmp_path / "unl"
    src.mkdir()
    write_image(ct(30), src / "a.nii.gz")
    first = run([src], managers(plans_dict), dataset_json, base)
    plans2 = copy.deepcopy(plans_dict)
    plans2["configurations"]["3d_fullres"]["spacing"] = [2.5, 2.0, 2.0]
    second = run([src], managers(plans2), dataset_json, base)
    assert count_calls["preprocess"] == 2 and second[0].case_id == first[0].case_id
    assert load_b2nd(second[0].data_file).shape == (1, 16, 16, 16)
    assert read_index(base)[0]["plans_fingerprint"] == ingest.plans_fingerprint(*managers(plans2))


def test_duplicate_content_is_ingested_once(tmp_path, pm_cm, dataset_json, base, count_calls, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    p1 = write_image(ct(40), a / "x.nii.gz")
    p2 = b / "copy_of_x.nii.gz"
    p2.write_bytes(Path(p1).read_bytes())
    write_image(ct(41), b / "y.nii.gz")
    write_image(ct(42), a / "z.nii.gz")
    cases = run([a, b], pm_cm, dataset_json, base, verbose=True)
    assert count_calls["preprocess"] == 3 and len(cases) == 3
    assert cases[0].source == (p1,)
    assert "Duplicate skipped" in capsys.readouterr().out
    entry = read_index(base)[0]
    assert entry["duplicates"] == [[str(p2)]] and {f["path"] for f in entry["files"]} == {p1, str(p2)}
    # the duplicate keeps the case alive when the first copy disappears
    os.remove(p1)
    again = run([a, b], pm_cm, dataset_json, base)
    assert count_calls["preprocess"] == 3
    assert {c.case_id for c in again} == {c.case_id for c in cases}
    assert [c.source for c in again if c.case_id == cases[0].case_id] == [(str(p2),)]


def test_vanished_sources_leave_the_folder(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    paths = [write_image(ct(50 + i), src / f"c{i}.nii.gz") for i in range(2)]
    first = run([src], pm_cm, dataset_json, base)
    os.remove(paths[1])
    second = run([src], pm_cm, dataset_json, base)
    assert second == first[:1]
    assert [e["case_id"] for e in read_index(base)] == [first[0].case_id]
    assert not any(n.startswith(first[1].case_id) for n in folder_files(base))


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    write_image(ct(60), src / "a.nii.gz")
    folder = Path(unlabeled_folder(base, "nnUNetPlans_3d_fullres"))
    folder.mkdir()
    (folder / ".pgltmp-123-abcd-unl_0123456789abcdef.b2nd").write_bytes(b"half")  # killed mid-write
    (folder / "unl_0123456789abcdef.b2nd").write_bytes(b"not indexed")  # written, index not yet updated
    cases = run([src], pm_cm, dataset_json, base)
    assert folder_files(base) == {".ingest.lock", "index.json"} | {cases[0].case_id + s for s in
                                                                   (".b2nd", "_seg.b2nd", ".pkl")}


def test_worker_failure_leaves_no_partial_output(tmp_path, pm_cm, dataset_json, base, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    src = tmp_path / "unl"
    src.mkdir()
    for i in range(2):
        write_image(ct(70 + i), src / f"c{i}.nii.gz")
    real = nnUNetDatasetBlosc2.save_case
    calls = []

    def failing_save(data, seg, props, prefix, **kw):
        calls.append(prefix)
        if len(calls) == 2:
            blosc2.asarray(np.ascontiguousarray(data), urlpath=prefix + ".b2nd")  # half-written case
            raise OSError("disk full")
        return real(data, seg, props, prefix, **kw)

    monkeypatch.setattr(nnUNetDatasetBlosc2, "save_case", staticmethod(failing_save))
    with pytest.raises(OSError, match="disk full"):
        run([src], pm_cm, dataset_json, base)
    files = folder_files(base)
    assert not [n for n in files if n.startswith(".pgltmp")]
    if "index.json" in files:
        folder = unlabeled_folder(base, "nnUNetPlans_3d_fullres")
        assert all(os.path.isfile(os.path.join(folder, e["case_id"] + ".b2nd")) for e in read_index(base))
    monkeypatch.setattr(nnUNetDatasetBlosc2, "save_case", staticmethod(real))
    assert len(run([src], pm_cm, dataset_json, base)) == 2


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------

def test_nonexistent_folder(tmp_path, pm_cm, dataset_json, base):
    with pytest.raises(IngestError, match=r"unl_missing.*does not exist"):
        run([tmp_path / "unl_missing"], pm_cm, dataset_json, base)
    assert not os.path.exists(unlabeled_folder(base, "nnUNetPlans_3d_fullres"))


def test_file_instead_of_folder(tmp_path, pm_cm, dataset_json, base):
    f = write_image(ct(0), tmp_path / "a.nii.gz")
    with pytest.raises(IngestError, match="is a file, not a folder"):
        run([f], pm_cm, dataset_json, base)


def test_empty_folder(tmp_path, pm_cm, dataset_json, base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"empty contains no usable 3D image \(it has no files\)"):
        run([tmp_path / "empty"], pm_cm, dataset_json, base)
    assert not os.path.exists(unlabeled_folder(base, "nnUNetPlans_3d_fullres"))


def test_unreadable_file_skipped_next_to_good_one_error_alone(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    (src / "x.nii.gz").write_text("this is not an image")
    good = write_image(ct(80), src / "good.nii.gz")
    with pytest.warns(IngestWarning, match=r"(?s)skipped 1 unlabeled file.*x\.nii\.gz: SimpleITK cannot read it"):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(good,)]

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "x.nii.gz").write_text("this is not an image")
    with pytest.raises(IngestError, match=r"(?s)alone contains no usable 3D image.*x\.nii\.gz: SimpleITK cannot read"):
        run([alone], pm_cm, dataset_json, base)


def test_truncated_nifti_is_skipped(tmp_path, pm_cm, dataset_json, base):
    # SimpleITK reads a truncated NIfTI without error (zeros for the missing voxels): the ingest must notice
    src = tmp_path / "unl"
    src.mkdir()
    whole = Path(write_image(ct(81), tmp_path / "whole.nii.gz")).read_bytes()
    (src / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    raw = gzip.decompress(whole)
    (src / "cut.nii").write_bytes(raw[: len(raw) - 1000])
    good = write_image(ct(82), src / "good.nii.gz")
    with pytest.warns(IngestWarning, match="skipped 2 unlabeled file") as rec:
        cases = run([src], pm_cm, dataset_json, base)
    msg = str(rec[0].message)
    assert "cut.nii.gz: truncated or corrupt gzip" in msg and "cut.nii: truncated NIfTI" in msg
    assert [c.source for c in cases] == [(good,)]


@pytest.mark.parametrize("kind", ["2d", "single_slice", "4d"])
def test_2d_and_4d_images_are_skipped(tmp_path, pm_cm, dataset_json, base, kind):
    src = tmp_path / "unl"
    src.mkdir()
    vol = ct(90)
    if kind == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(vol[8]), str(src / "bad.nii.gz"))
        expected = r"2D image"
    elif kind == "single_slice":
        write_image(vol[8:9], src / "bad.nii.gz")
        expected = r"2D image"
    else:
        im = sitk.JoinSeries([sitk.GetImageFromArray(vol), sitk.GetImageFromArray(vol)])
        sitk.WriteImage(im, str(src / "bad.nii.gz"))
        expected = r"4D image .*split it into 3D volumes"
    good = write_image(vol, src / "good.nii.gz")
    with pytest.warns(IngestWarning, match=expected):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(good,)]
    os.remove(good)
    with pytest.raises(IngestError, match=expected):
        run([src], pm_cm, dataset_json, base)


def test_mr_like_intensities_warn(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    mr = np.random.default_rng(0).uniform(0, 1000, size=SHAPE).astype(np.float32)
    write_image(mr, src / "mr.nii.gz")
    with pytest.warns(IngestWarning, match=r"(?s)mr\.nii\.gz: channel 0 \(CT\) does not look like CT.*CTNormalization"):
        cases = run([src], pm_cm, dataset_json, base)
    assert len(cases) == 1  # a warning, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real CT: no warning
        write_image(ct(91), src / "ct.nii.gz")
        os.remove(src / "mr.nii.gz")
        run([src], pm_cm, dataset_json, base)


def test_many_warnings_make_one_summary_each_and_a_full_report(tmp_path, pm_cm, dataset_json, base):
    """12 MR-like volumes and 7 unreadable files: one warning per kind (count, the first 5 files, what to check),
    not one per file; with ``report_dir`` every file is listed in the report, which a clean run removes."""
    src = tmp_path / "unl"
    src.mkdir()
    rng = np.random.default_rng(1)
    mr = sorted(write_image(rng.uniform(0, 1000, size=(8, 16, 16)).astype(np.float32), src / f"mr_{i:02d}.nii.gz")
                for i in range(12))
    bad = sorted(str(src / f"bad_{i}.nii.gz") for i in range(7))
    for b in bad:
        Path(b).write_bytes(b"not an image")

    def summaries(**kw):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            cases = run([src], pm_cm, dataset_json, base, **kw)
        assert len(cases) == 12
        assert all(issubclass(w.category, IngestWarning) for w in rec), [str(w.message) for w in rec]
        not_hu = [w for w in rec if "do not look like CT" in str(w.message)]
        skipped = [w for w in rec if str(w.message).startswith("skipped")]
        assert len(rec) == 2 and len(not_hu) == 1 and len(skipped) == 1, [str(w.message) for w in rec]
        return str(not_hu[0].message), not_hu[0].message, str(skipped[0].message), skipped[0].message

    text, w, skip_text, skip_w = summaries()
    assert text.startswith("12 unlabeled image file(s) do not look like CT in Hounsfield units")
    assert [p for p in mr if p in text] == mr[:5] and "... and 7 more" in text
    assert "CTNormalization" in text and "rescale slope/intercept" in text
    assert sorted(e.split(": channel 0 (CT)")[0] for e in w.entries) == mr
    assert skip_text.startswith("skipped 7 unlabeled file(s):")
    assert [p for p in bad if p in skip_text] == bad[:5] and "... and 2 more" in skip_text
    assert sorted(e.split(": ")[0] for e in skip_w.entries) == bad

    report_dir = tmp_path / "out"
    report_dir.mkdir()
    report = report_dir / ingest.REPORT_FILE
    text, _, skip_text, _ = summaries(report_dir=str(report_dir))  # cached: the same summary again
    assert f"(all 12 in {report})" in text and f"(all 7 in {report})" in skip_text
    lines = report.read_text().splitlines()
    for p in mr:
        assert sum(line.startswith(f"{p}: channel 0 (CT) does not look like CT") for line in lines) == 1
    for p in bad:
        assert sum(line.startswith(f"{p}: SimpleITK cannot read it") for line in lines) == 1

    for p in mr[1:] + bad:
        os.remove(p)
    write_image(ct(92), src / "ct.nii.gz")
    os.remove(mr[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([src], pm_cm, dataset_json, base, report_dir=str(report_dir))
    assert not report.exists()  # no stale report of the earlier run


PHASES = {"probe": (discovery, "probe"), "stat": (integrity, "file_stat"), "hash": (integrity, "hash_and_check"),
          "preprocess": (preprocessing, "preprocess_case")}


@pytest.mark.parametrize("phase", list(PHASES))
def test_file_disappearing_during_ingestion_is_skipped(tmp_path, pm_cm, dataset_json, base, monkeypatch, phase):
    """The file is deleted just before each step that touches it (header probe, stat, hash, read): skipped with a
    message that says so, the other case is ingested, nothing partial is left."""
    src = tmp_path / "unl"
    src.mkdir()
    gone = write_image(ct(95), src / "gone.nii.gz")
    good = write_image(ct(96), src / "good.nii.gz")
    module, name = PHASES[phase]
    real = getattr(module, name)

    def vanish_first(*args, **kw):
        touched = [a for a in args if a == gone or (isinstance(a, (tuple, list)) and gone in a)]
        if touched and os.path.exists(gone):
            os.remove(gone)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, vanish_first)
    with pytest.warns(IngestWarning, match=r"gone\.nii\.gz: the file disappeared during ingestion .*put it back"):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(good,)]
    assert [e["source"] for e in read_index(base)] == [[good]]
    assert not [n for n in folder_files(base) if n.startswith(".pgltmp")]
    assert len([n for n in folder_files(base) if n.endswith(".b2nd")]) == 2  # data + seg of the good case only


def test_duplicate_stands_in_for_a_vanished_file(tmp_path, pm_cm, dataset_json, base, monkeypatch):
    src = tmp_path / "unl"
    src.mkdir()
    a = write_image(ct(99), src / "a.nii.gz")
    b = src / "b.nii.gz"
    b.write_bytes(Path(a).read_bytes())  # the same content under another name
    real = preprocessing.preprocess_case

    def vanish_a(files, *args, **kw):
        if a in files and os.path.exists(a):
            os.remove(a)
        return real(files, *args, **kw)

    monkeypatch.setattr(preprocessing, "preprocess_case", vanish_a)
    with pytest.warns(IngestWarning, match=r"a\.nii\.gz: the file disappeared during ingestion"):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(str(b),)]
    assert [e["source"] for e in read_index(base)] == [[str(b)]]


def test_cases_of_other_folders_stay_cached(tmp_path, pm_cm, dataset_json, base, count_calls):
    """Another run (e.g. of another method) may train on folder A's cases while folder B is ingested alone."""
    src_a, src_b = tmp_path / "a", tmp_path / "b"
    src_a.mkdir()
    src_b.mkdir()
    write_image(ct(140), src_a / "a.nii.gz")
    write_image(ct(141), src_b / "b.nii.gz")
    first = run([src_a], pm_cm, dataset_json, base)
    second = run([src_b], pm_cm, dataset_json, base)
    assert [c.source for c in second] == [(str(src_b / "b.nii.gz"),)]
    assert [e["case_id"] for e in read_index(base)] == [second[0].case_id, first[0].case_id]
    assert os.path.isfile(first[0].data_file)
    assert run([src_a], pm_cm, dataset_json, base) == first and count_calls["preprocess"] == 2  # reused
    os.remove(src_a / "a.nii.gz")  # its source is gone: the cached case goes too
    run([src_b], pm_cm, dataset_json, base)
    assert [e["case_id"] for e in read_index(base)] == [second[0].case_id]
    assert not os.path.exists(first[0].data_file)


def test_nan_voxels_are_skipped(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    vol = ct(97).astype(np.float32)
    vol[3, 4, 5:9] = np.nan
    vol[5, 6, 7] = np.inf
    write_image(vol, src / "nan.nrrd")  # (SimpleITK's NIfTI IO turns NaN into 0; NRRD keeps it)
    good = write_image(ct(98), src / "good.nii.gz")
    with pytest.warns(IngestWarning, match=r"nan\.nrrd: 5 voxel\(s\) are NaN or Inf"):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(good,)]


# ---------------------------------------------------------------------------------------------------------------
# multi-channel datasets
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def two_channel(plans_dict, dataset_json):
    plans = copy.deepcopy(plans_dict)
    cfg = plans["configurations"]["3d_fullres"]
    cfg["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
    cfg["use_mask_for_norm"] = [False, False]
    props = plans["foreground_intensity_properties_per_channel"]
    props["1"] = dict(props["0"])
    dj = dict(dataset_json, channel_names={"0": "CT", "1": "CT_late"})
    return managers(plans), dj


def test_multichannel_files_form_one_case(tmp_path, two_channel, base):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    (pm, cm), dj = two_channel
    src = tmp_path / "unl"
    src.mkdir()
    files = [write_image(ct(100 + c), src / f"pat1_{c:04d}.nii.gz") for c in range(2)]
    cases = run([src], (pm, cm), dj, base)
    assert len(cases) == 1 and cases[0].source == tuple(files)
    assert cases[0].sha256 == sha256_of_files(files)
    ref = DefaultPreprocessor(verbose=False).run_case(files, None, pm, cm, dj)[0]
    got = load_b2nd(cases[0].data_file)
    assert got.shape[0] == 2
    np.testing.assert_array_equal(got, ref)


def test_multichannel_missing_channel_is_an_error(tmp_path, two_channel, base):
    (pm, cm), dj = two_channel
    src = tmp_path / "unl"
    src.mkdir()
    for c in range(2):
        write_image(ct(110 + c), src / f"pat1_{c:04d}.nii.gz")
    write_image(ct(112), src / "pat2_0000.nii.gz")
    with pytest.raises(IngestError, match=r"case 'pat2' .* lacks channel file\(s\) pat2_0001<ext>"):
        run([src], (pm, cm), dj, base)
    os.remove(src / "pat2_0000.nii.gz")
    write_image(ct(113), src / "pat3.nii.gz")
    with pytest.raises(IngestError, match=r"pat3\.nii\.gz: this dataset has 2 channels"):
        run([src], (pm, cm), dj, base)
    assert not os.path.exists(unlabeled_folder(base, "nnUNetPlans_3d_fullres"))


def test_channel_count_differs_from_the_dataset(tmp_path, pm_cm, dataset_json, two_channel, base):
    # one-channel dataset, a file with two values per voxel: skipped, the message says what to ingest
    src = tmp_path / "unl"
    src.mkdir()
    vec = sitk.Compose([sitk.GetImageFromArray(ct(114)), sitk.GetImageFromArray(ct(115))])
    sitk.WriteImage(vec, str(src / "two_values.nrrd"))
    good = write_image(ct(116), src / "good.nii.gz")
    with pytest.warns(IngestWarning, match=r"two_values\.nrrd: vector image \(2 components per voxel.*ingest scalar"):
        cases = run([src], pm_cm, dataset_json, base)
    assert [c.source for c in cases] == [(good,)]
    # two-channel dataset, a third channel file: an error before anything is written
    (pm, cm), dj = two_channel
    src2 = tmp_path / "unl2"
    src2.mkdir()
    for c in range(3):
        write_image(ct(117 + c), src2 / f"pat1_{c:04d}.nii.gz")
    base2 = os.path.join(os.path.dirname(base), "Dataset992_TwoChannels")
    os.makedirs(base2)
    with pytest.raises(IngestError, match=r"pat1_0002\.nii\.gz: channel 2 but this dataset has 2 channels"):
        run([src2], (pm, cm), dj, base2)
    assert not os.path.exists(unlabeled_folder(base2, "nnUNetPlans_3d_fullres"))


# ---------------------------------------------------------------------------------------------------------------
# helpers and the process pool
# ---------------------------------------------------------------------------------------------------------------

def test_sha256_of_files_and_the_checking_hash_agree(tmp_path):
    a = write_image(ct(120), tmp_path / "a.nii.gz")
    b = tmp_path / "b.txt"
    b.write_bytes(b"xyz" * 1000)
    expected = hashlib.sha256(Path(a).read_bytes() + b.read_bytes()).hexdigest()
    assert sha256_of_files([a, str(b)]) == expected
    assert integrity.hash_and_check([a, str(b)]) == (expected, [])


@pytest.mark.slow  # spawns two worker processes (each imports nnU-Net)
def test_two_worker_processes(tmp_path, pm_cm, dataset_json, base):
    src = tmp_path / "unl"
    src.mkdir()
    paths = [write_image(ct(130 + i), src / f"c{i}{ext}") for i, ext in enumerate([".nii.gz", ".nrrd", ".mha"])]
    (src / "x.nii.gz").write_text("not an image")
    with pytest.warns(IngestWarning, match="x.nii.gz"):
        cases = run([src], pm_cm, dataset_json, base, num_processes=2)
    assert [c.source for c in cases] == [(p,) for p in paths]
    serial_base = os.path.join(os.path.dirname(base), "Dataset991_Serial")
    os.makedirs(serial_base)
    with pytest.warns(IngestWarning):
        serial = run([src], pm_cm, dataset_json, serial_base, num_processes=1)
    for c, s in zip(cases, serial):
        np.testing.assert_array_equal(load_b2nd(c.data_file), load_b2nd(s.data_file))
