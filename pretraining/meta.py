"""``pgl_meta``: what a PGL checkpoint was pretrained on, so that fine-tuning can check it matches its plans."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Sequence

import nnunetv2
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

import nnunet_pgl

META_FORMAT = 1


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def architecture_fingerprint(configuration_manager: ConfigurationManager) -> str:
    """sha256 of the network class, its kwargs and the patch size: equal iff the same weights fit."""
    return _digest({"network_class": configuration_manager.network_arch_class_name,
                    "arch_kwargs": configuration_manager.network_arch_init_kwargs,
                    "patch_size": list(configuration_manager.patch_size)})


#: the intensity statistics that nnU-Net's CTNormalization applies (clip bounds, mean, std)
CT_STATS = ("percentile_00_5", "percentile_99_5", "mean", "std")


def ct_normalization(plans_manager: PlansManager, configuration_name: str) -> Dict[str, Dict[str, float]]:
    """``{channel: {percentile_00_5, percentile_99_5, mean, std}}`` of the channels the plans CT-normalise."""
    cm = plans_manager.get_configuration(configuration_name)
    props = plans_manager.plans.get("foreground_intensity_properties_per_channel") or \
        plans_manager.plans.get("foreground_intensity_properties_by_modality") or {}
    return {str(c): {k: float(props[str(c)][k]) for k in CT_STATS}
            for c, scheme in enumerate(cm.normalization_schemes)
            if scheme == "CTNormalization" and str(c) in props}


def plans_meta(plans_manager: PlansManager, configuration_name: str, num_input_channels: int) -> Dict[str, Any]:
    """The fields of ``pgl_meta`` that fine-tuning compares against its own plans."""
    cm = plans_manager.get_configuration(configuration_name)
    return {
        "plans_identifier": plans_manager.plans_name,
        "dataset_name": plans_manager.dataset_name,
        "configuration": configuration_name,
        "network_class": cm.network_arch_class_name,
        "architecture_fingerprint": architecture_fingerprint(cm),
        "patch_size": [int(p) for p in cm.patch_size],
        "num_input_channels": int(num_input_channels),
        "normalization_schemes": list(cm.normalization_schemes),
        "spacing": [float(s) for s in cm.spacing],
        "ct_normalization": ct_normalization(plans_manager, configuration_name),
    }


def build_meta(plans_manager: PlansManager, configuration_name: str, num_input_channels: int, method: str,
               levels: Sequence[int], cases: List[Dict[str, Any]]) -> Dict[str, Any]:
    meta = {"format": META_FORMAT, **plans_meta(plans_manager, configuration_name, num_input_channels),
            "method": method, "levels": [int(x) for x in levels],
            "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _dist_version("nnunetv2"),
            "nnunet_pgl_version": nnunet_pgl.__version__, "cases": cases}
    return meta


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def file_hash(path: str, cache: Dict[str, Any]) -> str:
    """sha256 of a file's bytes; ``cache`` maps path → {size, mtime, sha256} and is updated."""
    st = os.stat(path)
    hit = cache.get(path)
    if hit and hit["size"] == st.st_size and hit["mtime"] == st.st_mtime:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    cache[path] = {"size": st.st_size, "mtime": st.st_mtime, "sha256": h.hexdigest()}
    return h.hexdigest()
