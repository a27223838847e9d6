"""`tools/convert_checkpoint.py export|import`: the command line over export and import."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .common import ConversionError
from .export import export_checkpoint
from .hf_import import import_checkpoint

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

USAGE = """\
convert_checkpoint.py export --load CKPT_ROOT_OR_ITER_DIR --output HF_DIR [--iteration N]
                             [--allow-superposition-checkpoint] [--tokenizer-model PATH]
                             [--max-shard-size 5GB] [--dtype auto|float32|bfloat16|float16]
convert_checkpoint.py import --hf HF_DIR --save CKPT_ROOT [--iteration N] [--consumed-samples M]
                             [pretrain_tst.py flags of the run that will continue ...]"""


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py export", allow_abbrev=False,
        description="Export a pretrain_tst.py checkpoint (torch_dist, any TP/PP/EP) as a Hugging "
                    "Face model directory (Llama / Qwen3 / Qwen3-MoE, chosen from the config).")
    p.add_argument("--load", required=True, help="checkpoint root (its latest checkpoint) or an iter_* directory")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    p.add_argument("--iteration", type=int, default=None, help="export iter_N of the root instead of the latest")
    p.add_argument("--allow-superposition-checkpoint", action="store_true",
                   help="export a superposition-phase checkpoint anyway (not a next-token model)")
    p.add_argument("--tokenizer-model", default=None,
                   help="the run's tokenizer file, if it moved: a Hugging Face tokenizer.json (or its "
                        "directory), a SentencePiece .model, or a GPT-2 vocab.json (its merges.txt is "
                        "still read from the checkpoint's --merge-file)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; above it, shards")
    p.add_argument("--dtype", default="auto",
                   help="auto (the training dtype), float32, bfloat16, float16; the weights are the model's own "
                        "(a --bf16 run's bf16 weights: float32 widens them, it does not restore the "
                        "optimizer's fp32 main copy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py import", allow_abbrev=False, add_help=True,
        description="Turn a Hugging Face Llama / Qwen3 / Qwen3-MoE directory into a pretrain_tst.py "
                    "checkpoint. Any further arguments are pretrain_tst.py flags of the run that will "
                    "continue from it (tokenizer, --tst-*, optimizer, target "
                    "--tensor-model-parallel-size); model-shape flags must match the HF config.")
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to create")
    p.add_argument("--iteration", type=int, default=0, help="iteration number of the checkpoint")
    p.add_argument("--consumed-samples", type=int, default=None,
                   help="samples consumed up to --iteration (default iteration x --global-batch-size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "export":
            a = _export_parser().parse_args(rest)
            export_checkpoint(a.load, a.output, iteration=a.iteration,
                              allow_superposition=a.allow_superposition_checkpoint,
                              tokenizer_model=a.tokenizer_model, max_shard_size=a.max_shard_size,
                              dtype=a.dtype, progress=not a.no_progress)
        elif command == "import":
            a, run_argv = _import_parser().parse_known_args(rest)
            import_checkpoint(a.hf, a.save, run_argv, iteration=a.iteration,
                              consumed_samples=a.consumed_samples, progress=not a.no_progress)
        else:
            print(f"error: unknown command {command!r}\nusage:\n{USAGE}", file=sys.stderr)
            return 2
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
