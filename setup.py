"""nnunet_pgl: PGL self-supervised pretraining for nnU-Net v2."""
import os
import re

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "nnunet_pgl", "__init__.py")) as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md")) as f:
    long_description = f.read()

setup(
    name="nnunet_pgl",
    version=version,
    description="Prior-Guided Local (PGL) self-supervised pretraining for nnU-Net v2",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["nnunet_pgl", "nnunet_pgl.pretraining", "nnunet_pgl.trainers"],
    package_dir={
        "nnunet_pgl": "nnunet_pgl",
        "nnunet_pgl.pretraining": "pretraining",
        "nnunet_pgl.trainers": "trainers",
    },
    package_data={"nnunet_pgl.trainers": ["ext/*.py"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch",
        "numpy",
        "SimpleITK",
        "batchgenerators",
        "acvl-utils",
        "setuptools",
        "blosc2",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "mypy"],
    },
    entry_points={
        "console_scripts": [
            "pgl_selfcheck=nnunet_pgl.selfcheck:main",
            "pgl_pretrain=nnunet_pgl.pretraining.cli:main",
        ],
    },
)
