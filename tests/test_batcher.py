"""Batch formation, table-tested without Redis or a model."""

from __future__ import annotations

import pytest

from core.jobs import Bucket
from worker.batcher import Limits, Pending, Pick, by_bucket, fair_order, pick

SMALL = Bucket(64, 64, 10, 7.5)
WIDE = Bucket(72, 64, 10, 7.5)
BIG = Bucket(512, 512, 10, 7.5)
LIMITS = Limits(max_rows=4, max_pixels=8 * 512 * 512, timeout_s=1.0)


def job(name: str, arrived: float, bucket: Bucket = SMALL, rows: int = 1) -> Pending[str]:
    """A pending job whose handle is its name."""
    return Pending(name, bucket, rows, arrived, name)


def names(choice: Pick[str]) -> list[str]:
    """The jobs a pick runs."""
    return [p.job_id for p in choice.batch]


def test_lone_job_runs_at_once_when_nothing_more_is_coming() -> None:
    assert names(pick([job("a", 0.0)], LIMITS, now=0.0, more_coming=False)) == ["a"]


def test_partial_batch_waits_for_more_until_the_oldest_deadline() -> None:
    choice = pick([job("a", 0.0), job("b", 0.5)], LIMITS, now=0.6, more_coming=True)
    assert choice == Pick(batch=(), wake_at=1.0)


def test_partial_batch_runs_at_the_deadline() -> None:
    choice = pick([job("a", 0.0), job("b", 0.5)], LIMITS, now=1.0, more_coming=True)
    assert names(choice) == ["a", "b"]


def test_full_batch_runs_at_once_even_with_more_coming() -> None:
    pending = [job(str(i), i / 10) for i in range(6)]
    assert names(pick(pending, LIMITS, now=0.6, more_coming=True)) == ["0", "1", "2", "3"]


def test_buckets_never_mix_and_the_oldest_bucket_goes_first() -> None:
    pending = [job("w1", 0.0, WIDE), job("s1", 0.1), job("w2", 0.2, WIDE), job("s2", 0.3)]
    assert names(pick(pending, LIMITS, now=0.3, more_coming=False)) == ["w1", "w2"]


def test_a_full_younger_bucket_runs_while_the_older_one_waits() -> None:
    pending = [job("w", 0.0, WIDE), *(job(f"s{i}", 0.1 + i / 100) for i in range(4))]
    assert names(pick(pending, LIMITS, now=0.2, more_coming=True)) == ["s0", "s1", "s2", "s3"]


def test_pixel_budget_caps_large_images() -> None:
    limits = Limits(max_rows=8, max_pixels=2 * 512 * 512, timeout_s=1.0)
    pending = [job(str(i), i / 10, BIG) for i in range(4)]
    assert names(pick(pending, limits, now=0.5, more_coming=True)) == ["0", "1"]


def test_rows_count_images_not_jobs() -> None:
    pending = [job("a", 0.0, rows=3), job("b", 0.1, rows=2), job("c", 0.2, rows=1)]
    assert names(pick(pending, LIMITS, now=0.2, more_coming=True)) == ["a"]


def test_a_job_larger_than_the_cap_still_runs_alone() -> None:
    limits = Limits(max_rows=1, max_pixels=8 * 512 * 512, timeout_s=1.0)
    assert names(pick([job("a", 0.0, rows=4)], limits, now=0.0, more_coming=True)) == ["a"]


def test_without_early_flush_a_lone_job_waits_for_the_timeout() -> None:
    seed_like = Limits(max_rows=4, max_pixels=8 * 512 * 512, timeout_s=10.0, early_flush=False)
    assert pick([job("a", 0.0)], seed_like, now=0.1, more_coming=False).wake_at == 10.0


def test_nothing_pending_waits_for_arrivals() -> None:
    assert pick([], LIMITS, now=0.0, more_coming=False) == Pick()


@pytest.mark.parametrize(("pixels", "rows", "expected"), [(64 * 64, 4, 4), (512 * 512, 16, 8)])
def test_capacity(pixels: int, rows: int, expected: int) -> None:
    limits = Limits(max_rows=rows, max_pixels=8 * 512 * 512, timeout_s=1.0)
    side = int(pixels**0.5)
    assert limits.capacity(Bucket(side, side, 10, 7.5)) == expected


def test_groups_keep_the_order_given_and_the_group_with_the_oldest_job_goes_first() -> None:
    groups = by_bucket([job("b", 2.0), job("w", 1.0, WIDE), job("a", 0.0)])
    assert [[p.job_id for p in g] for g in groups] == [["b", "a"], ["w"]]


def tenant_job(name: str, arrived: float, tenant: str, priority: int = 1) -> Pending[str]:
    return Pending(name, SMALL, 1, arrived, name, tenant=tenant, priority=priority)


def test_fair_order_takes_the_tenant_holding_least_first_then_arrival() -> None:
    window = [tenant_job(f"h{i}", i, "heavy") for i in range(4)] + [tenant_job("l0", 9, "light")]
    assert [p.job_id for p in fair_order(window)] == ["h0", "l0", "h1", "h2", "h3"]
    # The heavy tenant already runs two jobs here: the light one goes first.
    assert [p.job_id for p in fair_order(window, {"heavy": 2})][:2] == ["l0", "h0"]
    # A class comes before any tenant's share; within a tenant, arrival.
    urgent = [*window, tenant_job("u", 10, "heavy", priority=0)]
    assert [p.job_id for p in fair_order(urgent, {"light": 5})] == [
        "u",
        "h0",
        "h1",
        "h2",
        "h3",
        "l0",
    ]


def test_a_batch_in_fair_order_holds_the_light_tenants_job() -> None:
    window = [tenant_job(f"h{i}", i / 10, "heavy") for i in range(8)]
    window.append(tenant_job("l", 1, "light"))
    assert "l" not in names(pick(window, LIMITS, now=1.0, more_coming=True))
    assert "l" in names(pick(fair_order(window), LIMITS, now=1.0, more_coming=True))
