"""fastfat: fast, correct adversarial training for robust fairness (FAT, Ma et al. NeurIPS 2022)."""
from setuptools import find_packages, setup

setup(
    name="fastfat",
    version="0.1.0",
    description="Fast, correct trainer for robust fairness in adversarial training (Madry, TRADES, FAT)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",   # tomllib
    # kernels/ lives at the top level of the repo but installs as fastfat.kernels:
    # a top-level import name `kernels` would clash with other packages.
    packages=find_packages(include=["fastfat", "fastfat.*"]) + ["fastfat.kernels"],
    package_dir={"fastfat.kernels": "kernels"},
    package_data={"fastfat.grids": ["*.toml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "scikit-learn",
        "scipy",
        "matplotlib",
        "tqdm",
        "pandas",
        "tabulate",   # pandas' to_markdown
        # the AutoAttack authors' package (attacks `aa`, `apgd`); pinned, since robust accuracy
        # is only comparable under one version of the attack. Its wheel declares no dependencies.
        "pyautoattack==0.2.0",
    ],
    extras_require={
        "ffcv": ["ffcv==1.0.2", "numba", "Pillow"],
        # torchattacks: the bench times fastfat.pgd beside torchattacks.PGD on the same model
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "py-spy", "pyinstrument", "torchattacks",
                "cvxpy"],
        # `fastfat sweep --ray`: the core package runs clusters (ray start, tasks, retries);
        # ray[default] adds the dashboard, which fastfat does not need
        "ray": ["ray>=2.10"],
    },
    entry_points={"console_scripts": ["fastfat=fastfat.cli:main"]},
)
