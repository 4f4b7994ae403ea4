"""Load traces for the scaling simulator: when each job arrives, seeded and reproducible."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

# Closed-loop users submit, wait for the image, look at it and write the next prompt; an open-loop
# Poisson stream at users / (think + response) offers the same load whatever the policy does,
# so every policy faces the very same arrivals.
THINK_S = 40.0
RESPONSE_S = 5.0


@dataclass(frozen=True)
class Trace:
    """A named sequence of job arrival times, in seconds from the start."""

    name: str
    description: str
    duration_s: float
    arrivals: tuple[float, ...]


def users_to_rate(users: float) -> float:
    """The arrival rate (jobs/s) of `users` closed-loop users."""
    return users / (THINK_S + RESPONSE_S)


def poisson(
    rate: Callable[[float], float], peak: float, duration_s: float, rng: random.Random
) -> tuple[float, ...]:
    """Arrivals of a Poisson process with a varying rate, thinned from one at the peak rate."""
    out: list[float] = []
    t = rng.expovariate(peak)
    while t < duration_s:
        if rng.random() * peak < rate(t):
            out.append(t)
        t += rng.expovariate(peak)
    return tuple(out)


def steady(seed: int = 0) -> Trace:
    """Half an hour at a constant 3 jobs/s."""
    arrivals = poisson(lambda _: 3.0, 3.0, 1800.0, random.Random(seed))
    return Trace("steady", "3 jobs/s for 30 min", 1800.0, arrivals)


def burst(seed: int = 0) -> Trace:
    """The seed's load test: 100 users, a 5-minute burst to 300, back to 100, then quiet."""
    low, high = users_to_rate(100), users_to_rate(300)

    def rate(t: float) -> float:
        if t < 600.0 or 900.0 <= t < 1500.0:
            return low
        return high if t < 900.0 else 0.0

    arrivals = poisson(rate, high, 1800.0, random.Random(seed))
    return Trace("burst", "100 users, 300 for 5 min, 100, quiet", 1800.0, arrivals)


SPIKE_HOURS = (11.0, 13.5, 19.0)  # a newsletter, a demo, a post going round
SPIKE_LEN_H = 0.25


def diurnal(seed: int = 0, day_s: float = 7200.0) -> Trace:
    """A working day compressed into `day_s`: quiet night, a daytime hump, three sharp spikes."""
    hour = day_s / 24.0

    def rate(t: float) -> float:
        h = t / hour
        daytime = 5.0 * max(0.0, math.sin(math.pi * (h - 7.0) / 15.0)) ** 2
        spike = 6.0 if any(s <= h < s + SPIKE_LEN_H for s in SPIKE_HOURS) else 0.0
        return 0.02 + daytime + spike

    arrivals = poisson(rate, 11.02, day_s, random.Random(seed))
    note = f"24 h in {day_s / 60:g} min: night 0.02/s, day up to 5/s, 3 spikes of +6/s"
    return Trace("diurnal", note, day_s, arrivals)


TRACES: dict[str, Callable[[int], Trace]] = {"steady": steady, "burst": burst, "diurnal": diurnal}
