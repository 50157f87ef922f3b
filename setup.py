"""nnunet_pgl: PGL self-supervised pretraining for nnU-Net v2."""
import os
import re

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunet_pgl_ext.pth"
PTH_LINE = "import nnunet_pgl_ext\n"  # runs nnunet_pgl_ext.apply(): sets nnUNet_extTrainer, imports only os


class build_py_with_pth(build_py):
    """Also put ``nnunet_pgl_ext.pth`` at the top of the wheel, i.e. into site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


cmdclass = {"build_py": build_py_with_pth}
try:  # editable installs (pip install -e) build a wheel of their own: add the same .pth to it
    from setuptools.command.editable_wheel import editable_wheel

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            strategy = super()._select_strategy(*args, **kwargs)

            class WithPth:
                def __enter__(self):
                    strategy.__enter__()
                    return self

                def __exit__(self, *exc):
                    return strategy.__exit__(*exc)

                def __call__(self, wheel, files, mapping):
                    strategy(wheel, files, mapping)
                    wheel.writestr(PTH_NAME, PTH_LINE)

            return WithPth()

    cmdclass["editable_wheel"] = editable_wheel_with_pth
except ImportError:  # very old setuptools: no PEP 660 editable installs; the README's export line applies
    pass

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
    packages=["nnunet_pgl", "nnunet_pgl.pretraining", "nnunet_pgl.pretraining.ingest", "nnunet_pgl.trainers",
              "nnunet_pgl.evaluation", "nnunet_pgl.demo"],
    py_modules=["nnunet_pgl_ext"],
    cmdclass=cmdclass,
    package_dir={
        "nnunet_pgl": "nnunet_pgl",
        "nnunet_pgl.pretraining": "pretraining",
        "nnunet_pgl.trainers": "trainers",
        "nnunet_pgl.evaluation": "evaluation",
        "nnunet_pgl.demo": "demo",
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
        "test": ["pytest", "mypy>=2.4,<3"],  # tests/test_typing.py: a new major release may change what it reports
    },
    entry_points={
        "console_scripts": [
            "pgl_selfcheck=nnunet_pgl.selfcheck:main",
            "pgl_pretrain=nnunet_pgl.pretraining.cli:main",
            "pgl_env=nnunet_pgl.trainers.discovery:main",
            "pgl_compare=nnunet_pgl.evaluation.compare:main",
            "pgl_demo=nnunet_pgl.demo.cli:main",
            "pgl_transfer=nnunet_pgl.trainers.transfer:main",
            "pgl_probe=nnunet_pgl.evaluation.probe_cli:main",
        ],
    },
)
