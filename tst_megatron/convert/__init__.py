"""Trainer checkpoints <-> Hugging Face `transformers` directories (Llama, Qwen3, Qwen3-MoE).

    export:  <save>/iter_XXXXXXX  (torch_dist, saved at any TP / PP / EP)
               -> HF directory: config.json, model.safetensors (or shards + index), tokenizer files
    import:  HF directory
               -> <save>/iter_XXXXXXX that `pretrain_tst.py --load <save>` continues (any TP/PP/EP)

Both directions run in ONE process (a 1-rank process group, megatron's parallel state with every
size 1) and go through the trainer's own pieces: the RunConfig saved in `tst_meta.json`, the
builders (`transformer_config`, `build_model_chunks`, `wrap_ddp`, `build_optimizer`,
`build_scheduler`) and `checkpointing.load_checkpoint` / `save_checkpoint`. Resharding from the
saved layout to TP=PP=EP=1 is megatron's dist_checkpointing's job: the model is built at size 1
and asks for the full tensors. The weight mapping itself is `hf_convert` (pure functions on full
state dicts).

Refusals are `ConversionError`s with a message naming the flag / field (the CLI prints it and
exits 2): a superposition-phase checkpoint (its model was trained on bags of tokens and is no
next-token model yet) unless `allow_superposition=True`, and a config the target architecture
cannot represent (hf_convert's ValueError, which names the field).

Import writes into `tst_meta.json` a RunConfig built from the flags given to the import (the run
the user will continue) with the model fields taken from the HF config, so the trainer's
checkpoint-compatibility check passes when the printed flags are used. The optimizer is fresh
(no Adam moments): continue with `--no-load-optim`.

Library use: call from a script with an `if __name__ == "__main__":` guard (or from pytest):
torch_dist's checkpoint writer starts a helper process with the "spawn" method, which imports the
main module again.
"""

from .cli import main
from .common import (ConversionError, load_megatron_model, megatron_session, parse_size, resolve_checkpoint,
                     run_config_from_args)
from .export import export_checkpoint
from .hf_import import import_checkpoint

__all__ = [
    "ConversionError",
    "parse_size",
    "resolve_checkpoint",
    "run_config_from_args",
    "megatron_session",
    "load_megatron_model",
    "export_checkpoint",
    "import_checkpoint",
    "main",
]
