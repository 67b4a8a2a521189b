"""The arithmetic behind every reported number: proportions with Wilson intervals,
means with normal-approximation intervals, win rates and head-to-head tallies."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of a proportion k/n (well-behaved at 0 and 1)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float | None, list[float] | None]:
    """Mean with a 95 % normal-approximation interval (mean ± z·SE)."""
    mean, se = mean_se(values)
    if mean is None:
        return None, None
    if se is None:
        return mean, None
    return mean, [mean - z * se, mean + z * se]


def win_rate(preferences: list[float]) -> tuple[float | None, float | None]:
    """AlpacaEval's win rate: the mean probability that the model's answer is preferred,
    in percent, with its standard error in percent."""
    mean, se = mean_se(preferences)
    return (None if mean is None else round(100 * mean, 2)), (None if se is None else round(100 * se, 2))


def h2h_outcome(p_a_first_order: float, p_a_second_order: float) -> str:
    """One item of a head-to-head judged in both orders: P(A better) from each order.
    A wins only if both orders prefer A; loses only if both prefer B; anything else,
    including an exact 0.5 or disagreeing orders, is a tie."""
    if p_a_first_order > 0.5 and p_a_second_order > 0.5:
        return "win"
    if p_a_first_order < 0.5 and p_a_second_order < 0.5:
        return "lose"
    return "tie"


def tally(outcomes: list[str]) -> dict:
    """win/tie/lose counts and the win rate (win + tie/2) / n."""
    n = len(outcomes)
    win, tie, lose = (outcomes.count(k) for k in ("win", "tie", "lose"))
    return {"n": n, "win": win, "tie": tie, "lose": lose,
            "win_rate": round((win + tie / 2) / n, 4) if n else None}
