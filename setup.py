"""megatron_sppo: Sequence-Level PPO on megatron-core.

Dependencies are ranges, never exact pins: inside an NGC PyTorch container the image's torch,
Transformer Engine and apex must stay. The exact versions the CPU test suite runs on are in
tools/constraints-cpu.txt (used by tools/setup_cpu.sh).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-sppo",
    version="0.1.0",
    description="Sequence-Level PPO (SPPO) and RL baselines for reasoning LLMs on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_sppo", "megatron_sppo.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.17,<0.21",
        "transformers>=4.51,<6",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "tensorboard>=2.15",
        "math-verify>=0.7",
        "nvidia-modelopt>=0.33",
        "PyYAML>=6.0",
        "psutil>=5.9",
        "tqdm>=4.66",
        "numpy>=1.26",
        "requests>=2.31",
        "matplotlib>=3.8",
        "pyarrow>=15",
    ],
    extras_require={
        # Transformer Engine (FP8, fused kernels) builds only with CUDA; NGC images ship it.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["megatron-sppo=megatron_sppo.cli:main"]},
)
