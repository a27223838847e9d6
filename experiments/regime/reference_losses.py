"""Reference values for the superposition-phase bag loss, computed from the data alone.

* unigram entropy: the cross-entropy on the validation split of the training split's unigram
  distribution. A bag loss at this value means the model predicts the next bag no better than
  token frequencies.
* count-model MCE: a model that predicts the next bag [t+s, t+2s) from the *last token* x of the
  current bag alone, with q(y | x) = mean over distances d = 1..s of the empirical
  P(token at distance d = y | x), smoothed towards the unigram. Evaluated with the uniform-weight
  multi-hot CE on the validation split's bags (non-overlapping, as the trainer cuts them).
Both are cheap (numpy over the .bin tokens) and say what a bag loss "should" beat.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def _split_tokens(prefix: str, split: str):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    n_docs = len(ds.document_indices) - 1
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    out = []
    for bounds in matrix[:2]:
        beg, end = int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs))
        docs = [ds[i] for i in range(beg, end)]
        out.append(np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64))
    return out


def reference_losses(prefix: str, max_bag: int, split: str = "98,2,0",
                     max_train_tokens: int = 8_000_000) -> Dict:
    train, valid = _split_tokens(prefix, split)
    train = train[:max_train_tokens]
    vocab = int(max(train.max(initial=0), valid.max(initial=0))) + 1
    uni_counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1e-3
    p_uni = uni_counts / uni_counts.sum()
    unigram_ce = float(-np.log(p_uni[valid]).mean())

    mce = {}
    for s in sorted({2, 4, 8, 16} | {max_bag}):
        if s > max_bag or len(valid) < 2 * s + 1:
            continue
        # Pairs (last token of a bag, token at distance d), d = 1..s, from every train position.
        keys = np.concatenate([train[:-d] * vocab + train[d:] for d in range(1, s + 1)])
        uniq, counts = np.unique(keys, return_counts=True)
        ctx_counts = np.bincount(uniq // vocab, weights=counts, minlength=vocab)
        # Validation bags as the trainer cuts them: bag i = [i*s, (i+1)*s), context = its last token.
        n_bags = (len(valid) - s) // s
        last = valid[np.arange(n_bags) * s + s - 1]
        targets = np.stack([valid[np.arange(n_bags) * s + s + j] for j in range(s)], axis=1)
        q_keys = last[:, None] * vocab + targets
        pos = np.searchsorted(uniq, q_keys)
        pos = np.minimum(pos, len(uniq) - 1)
        pair = np.where(uniq[pos] == q_keys, counts[pos], 0).astype(np.float64)
        # Additive smoothing towards the unigram; the strength is picked on the validation bags
        # (a slightly optimistic reference, which is what a floor to beat should be).
        best = None
        for k in (1.0, 10.0, 100.0, 1000.0):
            q = (pair + k * s * p_uni[targets]) / (ctx_counts[last][:, None] + k * s)
            value = float(-np.log(q).mean())
            best = value if best is None else min(best, value)
        mce[s] = best
    return {"unigram_entropy": unigram_ce, "count_model_mce": mce, "train_tokens": int(len(train)),
            "valid_tokens": int(len(valid)), "vocab": vocab}


if __name__ == "__main__":
    import sys

    print(reference_losses(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8))
