#!/usr/bin/env python3
"""Pretrain a GPT with Token-Superposition Training on megatron-core.

    torchrun --nproc-per-node 2 pretrain_tst.py --data-path PREFIX --tokenizer-type ... \
        --tst-bag-size 4 --tst-superposition-ratio 0.3 ...

Flags follow Megatron-LM; `--help` lists them. The loop lives in tst_megatron/trainer.py.
"""
import sys

from tst_megatron.trainer import main

if __name__ == "__main__":
    sys.exit(main())
