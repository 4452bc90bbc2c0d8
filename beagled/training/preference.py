"""Preference accuracy: how often an adapter prefers the better draft of a held-out pair. Pure arithmetic.

For each pair, DPO's implicit reward of a draft is ``log p(draft) - log p0(draft)`` (the adapter's
completion log-likelihood over the base's, summed over the completion tokens, given the same prompt).
The adapter *prefers* the better draft when its reward beats the worse draft's; preference accuracy is
the share of pairs where it does (TRL's ``rewards/accuracies``; a tie is not a preference, so the base
model itself, and a voice with no adapter, scores 0.0). Every backend computes it with this function
from its own log-likelihoods, so their numbers mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence


def preference_accuracy(
    good: Sequence[float], bad: Sequence[float], base_good: Sequence[float], base_bad: Sequence[float]
) -> float | None:
    """Share of pairs with ``good - base_good > bad - base_bad``; None when there are no pairs."""
    n = len(good)
    if not (len(bad) == len(base_good) == len(base_bad) == n):
        raise ValueError("preference_accuracy needs one log-likelihood per pair in every list")
    if n == 0:
        return None
    wins = sum(1 for g, b, g0, b0 in zip(good, bad, base_good, base_bad, strict=True) if g - g0 > b - b0)
    return wins / n
