"""Ingest folders of extra *unlabeled* images into a dataset's nnU-Net training space.

nnU-Net has no unlabeled training cases, so this package runs nnU-Net's own preprocessing on them: each case is
read with the dataset's reader (``plans_manager.image_reader_writer_class``; files of another format, e.g. NRRD in
a NIfTI dataset, with ``SimpleITKIO``) and passed through the plans' preprocessor (``run_case_npy`` without a
segmentation: transpose, crop to nonzero, the plans' normalization, resampling to the plans' spacing), exactly as
``DefaultPreprocessor.run_case`` does for a test image. The result is written with nnU-Net's own blosc2 writer
(``nnUNetDatasetBlosc2.save_case`` with the chunks and blocks from ``comp_blosc2_params``, as in
``run_case_save``) into a folder **beside** the preprocessed data::

    $nnUNet_preprocessed/DatasetXXX_Name/
        nnUNetPlans_3d_fullres/                 <- nnU-Net's (deleted on re-preprocessing; never touched here)
        nnUNetPlans_3d_fullres_pgl_unlabeled/   <- unlabeled_folder(...)
            unl_<16 hex>.b2nd       float32 (C, Z, Y, X), training space
            unl_<16 hex>_seg.b2nd   int16, -1 outside the nonzero mask, 0 inside (what nnU-Net stores for an
                                    image without labels; lets the stock ``nnUNetDatasetBlosc2`` load the case)
            unl_<16 hex>.pkl        properties (spacing, bbox, shapes, 'class_locations': {}, 'pgl_source', ...)
            index.json              one entry per case (see below)
            .ingest.lock            serialises concurrent ingests (e.g. every DDP rank) on POSIX

Case ids are content hashes (``'unl_' + sha256[:16]`` of the source file(s)), so the same image under two names
is stored once. ``index.json`` is a list of entries ``{case_id, sha256, source, duplicates, files,
plans_fingerprint, shape, warnings}`` where ``files`` holds ``path``, ``size`` and ``mtime_ns`` of every file
hashed for the case (all channels of the source and of its duplicates, plus detached data files of ``.mhd`` /
``.nhdr`` / ``.hdr`` headers).

Caching: a case is reused when an index entry has its sha256 and the current :func:`plans_fingerprint` and its
three files exist. Files whose (path, size, mtime_ns) match the index are not re-hashed; a touched file is
re-hashed and re-done only if its content changed.

The folder holds the returned cases plus the cases of earlier calls whose sources lie in other folders and still
exist (another run, e.g. of another method, may be training on them). Cases whose source files disappeared or
changed, and cases made for other plans, are dropped from the index and their files deleted (the folder is a cache
derived from the sources; ingesting them again re-creates them).

Writes are atomic: a worker writes ``.pgltmp-<run>-<case_id>*`` in the same folder and fsyncs them; the parent
``os.replace``s them to their final names and only then adds the index entry (index rewritten atomically, at most
every few seconds and at the end). Entries whose files are about to be replaced are removed from the index
first. A killed run therefore leaves an index that points only to complete files of the recorded plans
fingerprint; its leftover temporary files are removed by the next run. Worker processes are killed by the kernel
when the ingesting process dies (Linux), so a SIGKILL leaves no orphaned worker.

Bad inputs. ``IngestError`` (a ``ValueError``) names the file or folder and the next step; warnings are
``IngestWarning``. Everything but the reader's own failures is found before anything is written.

- raise: a non-existent folder, a file instead of a folder, an empty list of folders; a folder without any usable
  image (the message lists what was skipped there); no usable case at all.
- skip + one warning listing the skipped files and why: files SimpleITK cannot read (non-images, corrupt
  headers); truncated NIfTI or gzip data (checked while hashing: SimpleITK would read zeros for the missing
  voxels); files nnU-Net's reader fails on; 2D images (also a single slice), 4D images, vector/RGB images,
  images of zeros only, images with NaN/Inf voxels; files that disappear while the ingest runs. Same policy for
  all: nothing usable is lost, nothing unusable is trained on.
- multi-channel datasets, raise: a readable file without the ``_XXXX`` channel suffix, a channel index >= k, a
  missing channel file, two files for one channel, channel files of different size or spacing. A case whose
  channel file was skipped (unreadable, 2D, ...) is skipped with the warning.
- warn: a CT-normalized channel whose raw intensities look like MR (1st percentile > -500 or max < 200).

Warnings scale with the corpus: each kind (skipped files, images that do not look like HU CT, reader messages) is
one warning per run with the count, the first few files and what to check; the full list goes to
:data:`REPORT_FILE` in ``report_dir`` (``pgl_pretrain``'s output folder).

Folders are scanned non-recursively; hidden files (``.*``) are ignored. Only one ingest runs per unlabeled
folder at a time (a POSIX ``flock``; none on Windows, where concurrent runs into one folder are unsupported).

The phases, one module each (:mod:`.pipeline` runs them in order in :func:`ingest_unlabeled`):

- :mod:`.discovery`: the folders, which files form which case (channel grouping), detached data files;
- :mod:`.integrity`: hashing every case's files in one pass that checks them (truncated gzip / NIfTI);
- :mod:`.cache`: the folder, ``index.json``, :func:`plans_fingerprint`, the lock, committing case files;
- :mod:`.pool`: the worker processes (they die with the ingesting process) and the tasks run in them;
- :mod:`.preprocessing`: one case through nnU-Net's reader, preprocessor and blosc2 writer;
- :mod:`.report`: the warnings of a run and :data:`REPORT_FILE`; :mod:`.errors`: :class:`IngestError` and
  :class:`IngestWarning`.
"""
from __future__ import annotations

from .cache import plans_fingerprint, unlabeled_folder
from .discovery import companions
from .errors import IngestError, IngestWarning
from .pipeline import UnlabeledCase, ingest_unlabeled
from .report import REPORT_FILE

__all__ = ["ingest_unlabeled", "UnlabeledCase", "IngestError", "IngestWarning", "unlabeled_folder",
           "plans_fingerprint", "companions", "REPORT_FILE"]
