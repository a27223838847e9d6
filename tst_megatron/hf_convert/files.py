"""Reading and writing Hugging Face model directories (`config.json` + safetensors, sharded)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .config import _as_dict
from .weights import _own

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# ----------------------------------------------------------------------------------------------
# HF directories
# ----------------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _savable(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses aliasing)."""
    seen = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        aliased = ptr is not None and (ptr in seen or _nbytes(v) != v.untyped_storage().nbytes())
        if not v.is_contiguous() or aliased:
            v = _own(v)
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[k] = v.cpu()
    return out


def save_hf_directory(out_dir: str, hf_state_dict: Mapping[str, torch.Tensor], hf_config: Any, *,
                      max_shard_bytes: int = 5 * 1024 ** 3,
                      generation_config: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Write `config.json` and the weights as `transformers.from_pretrained` reads them.

    One `model.safetensors` when the tensors total <= max_shard_bytes, else
    `model-0000k-of-0000n.safetensors` shards (filled in key order, a new shard when the next
    tensor would overflow; a tensor larger than the limit gets a shard of its own) plus
    `model.safetensors.index.json`. Earlier `model*.safetensors` / index files in out_dir are
    removed first so the directory never mixes two saves. `generation_config` (a dict), when
    given, is written to generation_config.json. Returns the file names written.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes: must be positive")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or _SHARD_RE.match(name):
            os.remove(os.path.join(out_dir, name))
    tensors = _savable(hf_state_dict)
    written: List[str] = []
    config = _as_dict(hf_config)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    written.append("config.json")
    if generation_config is not None:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
            json.dump(dict(generation_config), fh, indent=2, sort_keys=True)
            fh.write("\n")
        written.append("generation_config.json")

    total = sum(_nbytes(v) for v in tensors.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, SAFE_WEIGHTS_NAME), metadata=meta)
        written.append(SAFE_WEIGHTS_NAME)
        return written
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        if shards[-1] and size + _nbytes(v) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += _nbytes(v)
    n = len(shards)
    weight_map = {}
    for idx, shard in enumerate(shards, start=1):
        name = f"model-{idx:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        written.append(name)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, SAFE_INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        fh.write("\n")
    written.append(SAFE_INDEX_NAME)
    return written


def load_hf_directory(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read (config dict, state dict) from an HF directory: single-file or sharded safetensors."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    index = os.path.join(path, SAFE_INDEX_NAME)
    state: Dict[str, torch.Tensor] = {}
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        for name in sorted(set(weight_map.values())):
            part = load_file(os.path.join(path, name))
            for k, v in part.items():
                if weight_map.get(k) != name:
                    raise ValueError(f"{SAFE_INDEX_NAME}: {k!r} found in {name}, index says "
                                     f"{weight_map.get(k)!r}")
                state[k] = v
        missing = set(weight_map) - set(state)
        if missing:
            raise ValueError(f"{SAFE_INDEX_NAME}: tensors missing from the shards: {sorted(missing)[:8]}")
    elif os.path.exists(single):
        state = load_file(single)
    else:
        raise FileNotFoundError(f"{path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
    return config, state
