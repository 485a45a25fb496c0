"""Packaging for fasttrain.

`kernels/` lives at the top of the repository so it can be read, benchmarked and reused on its own,
but it is installed as the subpackage `fasttrain.kernels` (a different project owns the top-level
name `kernels` on PyPI).
"""
from setuptools import find_packages, setup

setup(
    name="fasttrain-repeat",  # "fasttrain" is taken on PyPI
    version="0.1.0",
    description="Train families of GPT models on data with exactly controlled repetition (Hernandez et al. 2022)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fasttrain", "fasttrain.*"]) + ["fasttrain.kernels"],
    package_dir={"fasttrain": "fasttrain", "fasttrain.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "numpy>=1.24",
        "deepspeed>=0.15",
        "tokenizers>=0.19",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "transformers>=4.40", "submitit>=1.5", "pyarrow>=14",
                 "zstandard>=0.22", "transformer-lens>=3,<4", "wandb>=0.20"],
        "formats": ["pyarrow>=14", "zstandard>=0.22"],  # prepare --input *.parquet, *.jsonl.zst
        "flash": ["flash-attn>=2.6"],
        "slurm": ["submitit>=1.5"],
        "hf": ["transformers>=4.40"],
        "lens": ["transformer-lens>=3,<4"],  # fasttrain.interop; 4.0 removes HookedTransformer
        "wandb": ["wandb>=0.20"],  # train.wandb
    },
    entry_points={"console_scripts": ["fasttrain=fasttrain.cli:main"]},
)
