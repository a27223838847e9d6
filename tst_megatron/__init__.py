"""tst-megatron: Token-Superposition Training as a megatron-core plugin.

The whole TST delta lives in a few short modules:
  config.py     TSTConfig -- bag size, phase schedule, bag weighting, mode
  data.py       superposition data wrapper over megatron's GPTDataset
  embedding.py  bag embedding (mean of s token embeddings, before the TP reduction)
  loss.py       fused vocab-parallel multi-hot cross-entropy
  model.py      TSTGPTModel (GPTModel + the two pieces above)
CPU support for megatron-core is isolated in cpu.py; layer specs in specs.py.
"""
from . import _megatron  # noqa: F401  -- first: megatron-core imported with its torch.compile wrappers deferred
from .config import TSTConfig
from .loss import multi_hot_cross_entropy

__version__ = "0.1.0"


def __getattr__(name):
    # Model classes import megatron's transformer stack (GPTModel, layer specs); load them lazily.
    if name == "TSTGPTModel":
        from .model import TSTGPTModel

        return TSTGPTModel
    if name == "enable_cpu_support":
        from .cpu import enable_cpu_support

        return enable_cpu_support
    raise AttributeError(name)


__all__ = ["TSTConfig", "multi_hot_cross_entropy", "TSTGPTModel", "enable_cpu_support", "__version__"]
