"""One ``Metrics`` per daemon: the module functions update the current one only."""

from __future__ import annotations

import asyncio

from loopd import metrics


async def test_each_metrics_context_counts_only_its_own_events() -> None:
    """Tasks created under ``use(m)`` count into ``m``, never into another context's metrics."""
    first, second = metrics.Metrics(), metrics.Metrics()

    async def daemon(m: metrics.Metrics, events: int) -> None:
        metrics.use(m)  # what Daemon.run() does before it creates its tasks

        async def worker() -> None:
            for _ in range(events):
                metrics.event_received("webhook")
                metrics.rule_matched("r")

        await asyncio.gather(worker(), worker())

    await asyncio.gather(asyncio.create_task(daemon(first, 2)),
                         asyncio.create_task(daemon(second, 3)))
    assert first.value("loopd_events_received_total", source="webhook") == 4
    assert second.value("loopd_events_received_total", source="webhook") == 6
    assert b'loopd_rule_matches_total{rule="r"} 6.0' in second.exposition()
    assert metrics.current() is not first and metrics.current() is not second


def test_using_restores_the_previous_metrics() -> None:
    """``using(m)`` makes ``m`` current inside the block only."""
    before = metrics.current()
    with metrics.using(metrics.Metrics()) as m:
        assert metrics.current() is m
        metrics.rules_loaded(3, 1)
    assert metrics.current() is before
    assert (m.value("loopd_rules_loaded"), m.value("loopd_rule_load_errors")) == (3, 1)
