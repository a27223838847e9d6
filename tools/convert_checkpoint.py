#!/usr/bin/env python
"""Convert pretrain_tst.py checkpoints to / from Hugging Face `transformers` directories.

    # any TP/PP/EP torch_dist checkpoint -> Llama / Qwen3 / Qwen3-MoE directory (single process)
    python tools/convert_checkpoint.py export --load runs/tst --output hf/tst [--iteration N] \\
        [--allow-superposition-checkpoint] [--tokenizer-model PATH] [--max-shard-size 5GB]

    # HF directory -> checkpoint that `pretrain_tst.py --load runs/imported --no-load-optim` continues
    python tools/convert_checkpoint.py import --hf hf/tst --save runs/imported \\
        [--iteration N --consumed-samples M] [pretrain_tst.py flags: --tst-bag-size 4 ...]

`import` prints the model flags pretrain_tst.py needs. The logic is the package tst_megatron/convert/.
"""
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script from a checkout, like Megatron-LM's tools
    sys.path.insert(0, _REPO)

from tst_megatron.convert import main  # noqa: E402  (light: megatron is imported on use)

if __name__ == "__main__":  # the guard matters: torch_dist's writer spawns a helper process
    sys.exit(main())
