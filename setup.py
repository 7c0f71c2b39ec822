"""Installs the `cluda` library and the `kernels` package (the pixel InfoNCE op)."""
from setuptools import find_packages, setup

setup(
    name="cluda",
    version="0.1.0",
    description="CLUDA: contrastive UDA for semantic segmentation with a fused pixel InfoNCE kernel",
    python_requires=">=3.9",
    packages=find_packages(include=["cluda", "cluda.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.1",
        # Triton ships with torch's Linux wheels; the fused kernel needs it (or TRITON_INTERPRET=1 on CPU).
        "triton>=2.2; platform_system == 'Linux'",
        "timm>=1.0",
        # The strong augmentation's colour jitter and blur (transforms.v2.functional; 0.16 pairs with torch 2.1).
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
