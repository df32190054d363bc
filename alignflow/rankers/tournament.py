"""Ranking a prompt's candidates by pairwise games: which pairs play (every pair, or `max_pairs` drawn,
seeded) and each candidate's win rate (a tie counts half). The LLM judge and Label Studio's pairwise
labels share it.
"""

from __future__ import annotations

import itertools
import random


def candidate_pairs(texts: list[str], max_pairs: int | None, rng: random.Random) -> list[tuple[int, int]]:
    """(i, j), i < j, for every pair of distinct candidates of one prompt, or `max_pairs` of them drawn
    with `rng` (the judge's tournament cap; Label Studio's tasks per prompt)."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if texts[i] != texts[j]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(rng.sample(pairs, max_pairs))
    return pairs


def win_rates(candidates: list[list[str]], games: list[tuple[int, int, int]], outcomes: list[float]
              ) -> list[list[float]]:
    """Per prompt, each candidate's share of its pairwise games won (a tie counts half); `games` are
    (prompt index, i, j) with outcome 1.0 when i won. A candidate in no game (an identical copy of
    another, or one a cap left out) scores 0.5."""
    wins = [[0.0] * len(c) for c in candidates]
    played = [[0] * len(c) for c in candidates]
    for (k, i, j), p in zip(games, outcomes):
        wins[k][i] += p
        wins[k][j] += 1 - p
        played[k][i] += 1
        played[k][j] += 1
    return [[w / g if g else 0.5 for w, g in zip(ws, gs)] for ws, gs in zip(wins, played)]
