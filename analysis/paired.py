"""Paired comparisons over seeds: the one statistics rule every table, card and chart follows.

Two models trained at the same seeds with a real pairing (same data order, same initial weights
for every shared tensor) give one difference per seed. We report n, the mean, the sample std, a
95 % t-interval of the mean (Student's t with n - 1 degrees of freedom) and how many seeds were
positive, and say that a model *beats* another only when the interval excludes zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """The paired differences of n seeds, summarised (same unit as the differences)."""

    n: int
    mean: float
    std: Optional[float]        # sample std (ddof 1); None for one seed
    low: Optional[float]        # the 95 % t-interval of the mean; None below 2 seeds
    high: Optional[float]
    positive: int               # seeds whose difference is > 0

    @property
    def verdict(self) -> str:
        """'beats' / 'trails' when the interval excludes 0, else 'no measurable difference'."""
        if self.low is not None and self.low > 0:
            return "beats"
        if self.high is not None and self.high < 0:
            return "trails"
        return "no measurable difference"

    def text(self, scale: float = 100, digits: int = 2) -> str:
        """'+0.38 ± 0.08, 95 % CI [−0.34, +1.10], 2/2 seeds > 0 (n = 2)' in points (scale 100)."""
        if self.n == 0:
            return ""
        head = f"{scale * self.mean:+.{digits}f}"
        if self.n == 1:
            return f"{head} (n = 1, no interval)"
        return (f"{head} ± {scale * self.std:.{digits}f}, 95 % CI [{scale * self.low:+.{digits}f}, "
                f"{scale * self.high:+.{digits}f}], {self.positive}/{self.n} seeds > 0 (n = {self.n})")

    def to_dict(self, digits: int = 5) -> dict:
        """JSON for a card: n, mean, std, the interval, seeds > 0 and the verdict (None where undefined)."""
        r = lambda x: None if x is None or math.isnan(x) else round(x, digits)  # noqa: E731
        return {"n": self.n, "mean": r(self.mean), "std": r(self.std), "ci95_low": r(self.low),
                "ci95_high": r(self.high), "positive": self.positive,
                "verdict": self.verdict if self.n > 1 else "one seed, no claim"}

    def sentence(self, model: str, baseline: str) -> str:
        """The claim the interval allows, in words."""
        if self.n < 2:
            return f"{model} vs {baseline}: one seed, no claim"
        if self.verdict == "no measurable difference":
            return f"no measurable difference between {model} and {baseline} at n = {self.n}"
        return f"{model} {self.verdict} {baseline} (95 % interval excludes 0, n = {self.n})"


def paired_difference(differences: Iterable[Optional[float]]) -> PairedDifference:
    """Summarise per-seed differences (missing ones left out)."""
    d = [float(x) for x in differences if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(d)
    if n == 0:
        return PairedDifference(0, math.nan, None, None, None, 0)
    mean = sum(d) / n
    positive = sum(x > 0 for x in d)
    if n == 1:
        return PairedDifference(1, mean, None, None, None, positive)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, positive)


def card_seed_differences(card: dict) -> dict:
    """A grid card's paired differences over its seeds (`seeds`: one entry per seed):
    {"test": PairedDifference, "fit": PairedDifference}; empty for a card without seeds or a dense one."""
    seeds = card.get("seeds") or []
    test = paired_difference(s.get("delta_vs_dense") for s in seeds)
    if test.n == 0:
        return {}
    return {"test": test, "fit": paired_difference(s.get("fit_delta_vs_dense") for s in seeds)}


def card_paired_summary(seeds: list) -> dict:
    """What a grid card says of its seeds' paired differences (test and fit), with the baseline named."""
    test = paired_difference(s.get("delta_vs_dense") for s in seeds)
    if test.n == 0:
        return {}
    return {"baseline": seeds[0].get("baseline") or "dense", "test_accuracy": test.to_dict(),
            "fit_accuracy": paired_difference(s.get("fit_delta_vs_dense") for s in seeds).to_dict()}
