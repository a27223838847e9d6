"""TST configuration: the four knobs of Token-Superposition Training.

A `TSTConfig` is passed explicitly to the data wrapper, the model and the trainer; nothing
reads global arguments. See `../shared/TST.md` / README for the method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

WEIGHTINGS = ("uniform", "power", "exp", "first", "fitted")
MODES = ("full", "input", "output")
PHASES = ("superposition", "recovery")


@dataclass
class TSTConfig:
    """Token-Superposition Training settings.

    bag_size: s, tokens per bag (1 disables TST: plain next-token training).
    superposition_ratio: fraction r of all training iterations spent in the superposition
        phase (0 <= r < 1). Ignored when `superposition_iters` is given.
    superposition_iters: explicit number of superposition iterations (overrides the ratio).
    bag_weighting: how the s targets of the next bag are weighted in the multi-hot CE:
        uniform (1/s), power (1/i), exp (exp(-i)), first (first token only), fitted
        (C0 + a*d^k, the power law the paper fitted to token mutual information).
    mode: full (bag input, next-bag target), input (bag input, next-token target) or
        output (token input, next-bag target).
    """

    bag_size: int = 1
    superposition_ratio: float = 0.0
    superposition_iters: Optional[int] = None
    bag_weighting: str = "uniform"
    mode: str = "full"
    fitted_c0: float = 3.63
    fitted_a: float = 1.35
    fitted_k: float = -1.25

    def __post_init__(self):
        if isinstance(self.bag_size, bool) or not isinstance(self.bag_size, int) or self.bag_size < 1:
            raise ValueError(f"TSTConfig.bag_size must be an integer >= 1 (got {self.bag_size!r}); "
                             "1 disables token superposition")
        r = self.superposition_ratio
        if not isinstance(r, (int, float)) or not math.isfinite(r) or not (0.0 <= r < 1.0):
            raise ValueError(f"TSTConfig.superposition_ratio must be in [0, 1) (got {r!r}); "
                             "the paper finds 0.2-0.4 robust and r = 1 gives a useless model")
        if self.superposition_iters is not None:
            it = self.superposition_iters
            if isinstance(it, bool) or not isinstance(it, int) or it < 0:
                raise ValueError("TSTConfig.superposition_iters must be an integer >= 0 "
                                 f"(got {it!r})")
        if self.bag_weighting not in WEIGHTINGS:
            raise ValueError(f"TSTConfig.bag_weighting must be one of {', '.join(WEIGHTINGS)} "
                             f"(got {self.bag_weighting!r})")
        if self.mode not in MODES:
            raise ValueError(f"TSTConfig.mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.bag_weighting == "fitted":
            w = [self._fitted(d) for d in range(1, self.bag_size + 1)]
            if not all(math.isfinite(x) and x > 0 for x in w):
                raise ValueError("TSTConfig.fitted_c0/fitted_a/fitted_k must give positive finite "
                                 f"weights C0 + a*d^k for d = 1..{self.bag_size} (got {w})")

    # ------------------------------------------------------------------ weights
    def _fitted(self, d: int) -> float:
        # The paper's power law fitted to token mutual information at distance d (DCLM):
        # C0 + a * d**k. Used as the (unnormalised) weight of the d-th target of a bag, C0
        # included, as our summary of the paper states it (its Appendix D was not available to
        # us): with C0 = 3.63 the weights are close to uniform (0.20 ... 0.15 at s = 6).
        return self.fitted_c0 + self.fitted_a * d ** self.fitted_k

    @property
    def enabled(self) -> bool:
        """True when training uses superposition at all (s > 1)."""
        return self.bag_size > 1

    def bag_weights(self) -> List[float]:
        """Normalised weights (sum 1) of the s targets of a bag, nearest target first."""
        s = self.bag_size
        idx = range(1, s + 1)
        if self.bag_weighting == "uniform":
            raw = [1.0] * s
        elif self.bag_weighting == "power":
            raw = [1.0 / i for i in idx]
        elif self.bag_weighting == "exp":
            raw = [math.exp(-i) for i in idx]
        elif self.bag_weighting == "first":
            raw = [1.0] + [0.0] * (s - 1)
        else:
            raw = [self._fitted(i) for i in idx]
        total = sum(raw)
        return [x / total for x in raw]

    # ------------------------------------------------------------------ schedule
    def num_superposition_iters(self, train_iters: int) -> int:
        """Number of iterations [0, n) run in the superposition phase."""
        if not self.enabled:
            return 0
        if self.superposition_iters is not None:
            n = self.superposition_iters
        else:
            n = int(math.floor(self.superposition_ratio * train_iters + 1e-9))
        if train_iters > 0 and n >= train_iters:
            raise ValueError(f"TST superposition iterations ({n}) must be < train iterations "
                             f"({train_iters}): the run needs a recovery phase to end as a "
                             "next-token model (--tst-superposition-iters / --tst-superposition-ratio)")
        return n

    def phase(self, iteration: int, train_iters: int) -> str:
        """'superposition' or 'recovery' for a 0-based iteration index."""
        return "superposition" if iteration < self.num_superposition_iters(train_iters) else "recovery"
