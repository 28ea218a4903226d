"""Erlang C: the M/M/c queue in closed form, the yardstick the simulator is checked against."""

from __future__ import annotations

import math


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits, for `servers` servers and offered load λ/μ (Erlangs)."""
    if offered >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers
    waiting = last * servers / (servers - offered)
    return waiting / (total + waiting)


def response_within(servers: int, arrival_rate: float, service_rate: float, target: float) -> float:
    """P(wait + service <= target) in an M/M/c queue served first come, first served.

    With C = `erlang_c`, a = λ/μ and c servers, the response time T satisfies
    P(T > t) = e^(-μt) (1 + C (1 - e^(-(c-1-a)μt)) / (c-1-a)), and e^(-μt)(1 + Cμt) when c-1 = a.
    """
    offered = arrival_rate / service_rate
    if offered >= servers:
        raise ValueError("the queue is unstable (load >= servers)")
    wait = erlang_c(servers, offered)
    mu_t = service_rate * target
    gap = servers - 1 - offered
    if abs(gap) < 1e-9:
        tail = math.exp(-mu_t) * (1 + wait * mu_t)
    else:
        tail = math.exp(-mu_t) * (1 + wait * (1 - math.exp(-gap * mu_t)) / gap)
    return 1.0 - tail
