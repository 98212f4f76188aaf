"""Installs the ``cpm_d2`` package (CPM for audio-visual segmentation on Detectron2).

torch, torchvision, torchaudio and detectron2 are *not* listed in ``install_requires``: their
right build depends on the machine, so ``tools/setup_env.sh`` (run by ``make demo`` / ``make
test``) installs them first, as Mask2Former's INSTALL.md does.
"""
from setuptools import find_packages, setup

setup(
    name="cpm_d2",
    version="0.1.0",
    description="Class-conditional Prompting Machine (CPM) for audio-visual segmentation, on Detectron2",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "datasets")),
    python_requires=">=3.9",
    install_requires=[
        "fvcore>=0.1.5",
        "iopath",
        "pycocotools",
        "scipy",
        "numpy",
        "opencv-python-headless",
        "soundfile",
        "tabulate",
        "Pillow",
        "av",
        "tqdm",
        "tensorboard",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
