"""pytest configuration shared by the suite."""
import os

import torch

# Without a GPU, Triton kernels (the MCE loss's CUDA path) run in Triton's interpreter, so the
# suite checks them on CPU too. Must be set before triton is first imported; inherited by workers.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a running SLURM (tests/slurm/setup_slurm.sh); run with -m slurm")
