"""tst-megatron: Token-Superposition Training for megatron-core."""
from setuptools import find_packages, setup

setup(
    name="tst-megatron",
    version="0.1.0",
    description="Token-Superposition Training (TST) as a megatron-core plugin and pretraining framework",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tst_megatron", "tst_megatron.*"]),
    install_requires=[
        # A range, so GPU users keep the CUDA build they already have.
        "torch>=2.6,<3",  # megatron-core 0.16.1 needs >= 2.6
        # 0.16.1 is the newest megatron-core release that supports Python 3.11 (0.17+ need 3.12).
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "sentencepiece",
        "psutil",  # megatron's torch_dist checkpoint writer logs process memory through it
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # triton: the MCE loss's CUDA kernels, checked on CPU in Triton's interpreter by the tests
        "test": ["pytest", "transformers", "safetensors", "tokenizers", "protobuf", "matplotlib", "tensorboard",
                 "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "triton": ["triton>=3.2"],
        "hf": ["transformers", "safetensors", "tokenizers", "protobuf"],  # protobuf: reading .model files
        "plot": ["matplotlib"],
        # the range megatron-core 0.16.1's own dev extra pins
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    py_modules=["pretrain_tst"],
)
