"""ScrapeSource against Debian's real node exporter and controllable /metrics targets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from loopd import metrics
from loopd.catalog.telemetry import Telemetry
from loopd.config import ScrapeSourceConfig
from loopd.events import Delivery, Event
from loopd.sources.base import Supervisor
from loopd.sources.scrape import ScrapeSource
from tests.e2e.daemon import Config, LoopdProcess
from tests.servers import free_port, wait_until
from tests.servers.exporters import OPENMETRICS, MetricsTarget, node_exporter


class Collector:
    """An emit function that keeps events and acks them like the engine does."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.events.append(delivery.event)
        delivery.ack()

    def on(self, topic: str) -> list[Event]:
        return [e for e in self.events if e.topic == topic]


def config(targets: list[str], **extra: Any) -> ScrapeSourceConfig:
    return ScrapeSourceConfig.model_validate(
        {"type": "scrape", "name": "node", "targets": targets, "interval": "500ms", **extra})


def sample(name: str, **labels: str) -> float:
    return metrics.current().value(name, **labels)


@contextlib.asynccontextmanager
async def running(source: ScrapeSource, emit: Collector) -> AsyncIterator[None]:
    supervisor = Supervisor(source, emit)
    task = asyncio.create_task(supervisor.run())
    try:
        yield
    finally:
        await supervisor.stop()
        await asyncio.wait_for(task, 10)


async def scrape(source: ScrapeSource, emit: Collector, times: int = 1) -> None:
    """Scrape every target of ``source`` ``times`` in a row, without its timer."""
    async with aiohttp.ClientSession() as http:
        for _ in range(times):
            for target in source.targets:
                await source.scrape_once(target, http, emit)


async def test_node_exporter_samples_become_telemetry_events() -> None:
    """The real node exporter's allowed samples arrive as ``metrics/<instance>/<name>``
    events keyed by the instance, with target labels, a synthesized ``up`` of 1, a
    counter in ``rate`` as a per-second rate from the second scrape on, and nothing else."""
    async with node_exporter() as exporter:
        source = ScrapeSource(config(
            [exporter.target], metrics=["node_load1", "node_filesystem_*",
                                        "node_network_receive_bytes_total"],
            drop=["node_filesystem_device_error"], rate=["node_network_receive_bytes_total"]))
        emit = Collector()
        async with running(source, emit):
            await wait_until(lambda: len(emit.on(f"metrics/{exporter.target}/up")) >= 3,
                             timeout=30, what="three scrapes of the node exporter")
    instance = exporter.target
    names = {e.topic.rsplit("/", 1)[1] for e in emit.events}
    assert "node_load1" in names and "up" in names
    assert all(n in ("node_load1", "up", "node_network_receive_bytes_total")
               or n.startswith("node_filesystem_") for n in names), names
    assert "node_filesystem_device_error" not in names
    load = emit.on(f"metrics/{instance}/node_load1")[0]
    assert load.key == instance and load.source == "node"
    assert load.data["labels"] == {"instance": instance, "job": "node"}
    assert isinstance(load.data["value"], float) and load.data["value"] >= 0
    assert all(e.data["value"] == 1 for e in emit.on(f"metrics/{instance}/up"))
    rates = emit.on(f"metrics/{instance}/node_network_receive_bytes_total")
    assert rates and all(e.data["value"] >= 0 and "device" in e.data["labels"] for e in rates)
    first_up = emit.on(f"metrics/{instance}/up")[0]
    assert not [e for e in rates if e.time <= first_up.time], "a rate needs two scrapes"


async def test_changed_metric_gzip_and_openmetrics_are_read() -> None:
    """A target whose value changes is read anew each scrape, gzipped or not, and an
    OpenMetrics body (by Content-Type) is parsed with its own parser, timestamps kept."""
    async with MetricsTarget.serve(gzip=True) as plain, \
            MetricsTarget.serve(content_type=OPENMETRICS) as om:
        source = ScrapeSource(config([plain.target, om.target]))
        emit = Collector()
        plain.set(load=1.5)
        om.body = "# TYPE temp gauge\ntemp{room=\"a\"} 21.5 1700000000.25\n# EOF\n"
        await scrape(source, emit)
        plain.set(load=7)
        # a scrape's id holds its time in milliseconds: two scrapes a timer apart never
        # share one, two in a row on a fast machine could
        await asyncio.sleep(0.01)
        await scrape(source, emit)
    assert [e.data["value"] for e in emit.on(f"metrics/{plain.target}/load")] == [1.5, 7.0]
    temp = emit.on(f"metrics/{om.target}/temp")
    assert [e.time for e in temp] == [1700000000.25, 1700000000.25]
    assert temp[0].data["labels"] == {"room": "a", "instance": om.target, "job": "node"}
    assert temp[0].id != temp[1].id  # one id per series and scrape
    assert temp[0].id.startswith(f"{om.target}@") and temp[0].id.endswith('/temp{room="a"}')


async def test_failures_are_counted_and_logged_per_target_and_disturb_nothing() -> None:
    """Bad exposition text, a 500, a target slower than the timeout, a refused connection
    and an unknown host each count a failure with their reason and log it with the target,
    and give ``up`` 0; a target of 100,000 series keeps max_series and counts the rest; the
    healthy target's samples keep coming every scrape."""
    huge = "".join(f'big{{n="{i}"}} {i}\n' for i in range(100_000))
    async with MetricsTarget.many(5) as (good, bad, failing, slow, big):
        good.set(load=2)
        bad.body = 'load{host="a} 1\n'
        failing.status = 500
        slow.delay, slow.body = 30.0, "load 1\n"
        big.body = huge
        refused = f"127.0.0.1:{free_port()}"
        source = ScrapeSource(config(
            [*(t.target for t in (good, bad, failing, slow, big)), refused,
             "no-such-host.invalid:9100"], interval="2s", timeout="1s", max_series=1000))
        emit = Collector()
        with capture_logs() as logs:
            async with running(source, emit):
                await wait_until(
                    lambda: len(emit.on(f"metrics/{source.targets[0].instance}/load")) >= 3,
                    timeout=30, what="three scrapes of the healthy target")
                # each target's second failure is counted before its second up sample
                await wait_until(lambda: all(len(emit.on(f"metrics/{t.instance}/up")) >= 2
                                             for t in source.targets),
                                 timeout=30, what="two scrapes of every target")
    reasons = {t.instance: r for t, r in zip(source.targets, [
        None, "parse", "http", "timeout", None, "connection", "dns"], strict=True)}
    for instance, reason in reasons.items():
        ups = {e.data["value"] for e in emit.on(f"metrics/{instance}/up")}
        assert ups == ({1} if reason is None else {0}), (instance, ups)
        if reason is not None:
            assert sample("loopd_scrape_failures_total", source="node", target=instance,
                          reason=reason) >= 2
            assert any(line["event"] == "scrape failed" and line["target"] == instance
                       and line["reason"] == reason for line in logs), instance
    big_instance = source.targets[4].instance
    per_scrape = Counter(e.id.split("/")[0] for e in emit.events
                         if e.topic == f"metrics/{big_instance}/big")
    assert per_scrape and set(per_scrape.values()) == {1000}, per_scrape
    assert sample("loopd_scrape_series_dropped_total", source="node",
                  target=big_instance) >= 99_000
    assert any(line["event"].startswith("scrape exceeds max_series") for line in logs)
    good_loads = emit.on(f"metrics/{source.targets[0].instance}/load")
    assert all(e.data["value"] == 2 for e in good_loads)


async def test_counter_rates_handle_a_reset() -> None:
    """A counter in ``rate`` becomes its increase per second between scrapes; after a
    reset (a lower value) the increase is the new value, as Prometheus's rate()."""
    async with MetricsTarget.serve() as target:
        source = ScrapeSource(config([target.target], rate=["requests_*"]))
        emit = Collector()
        for value in (100, 160, 10):
            target.body = f"# TYPE requests_total counter\nrequests_total {value}\n"
            await scrape(source, emit)
    ups = [e.time for e in emit.on(f"metrics/{target.target}/up")]
    rates = emit.on(f"metrics/{target.target}/requests_total")
    assert len(rates) == 2  # the first scrape has nothing to compare with
    assert rates[0].data["value"] == pytest.approx(60 / (ups[1] - ups[0]))
    assert rates[1].data["value"] == pytest.approx(10 / (ups[2] - ups[1]))


async def test_a_series_that_disappears_leaves_telemetry_after_two_scrapes() -> None:
    """``telemetry[instance]`` holds a field per series (name, or name{labels}); a series
    missing from two scrapes in a row is forgotten, one missing once is kept."""
    async with MetricsTarget.serve() as target:
        source = ScrapeSource(config([target.target]))
        emit = Collector()
        telemetry = Telemetry()
        target.body = 'load 3\ndisk{mount="/"} 0.5\n'
        await scrape(source, emit)
        for event in emit.events:
            telemetry.observe(event)
        fields = telemetry[target.target]
        assert fields["load"] == 3 and fields['disk{mount="/"}'] == 0.5 and fields["up"] == 1
        target.body = "load 4\n"
        for gone in range(1, 3):
            emit.events.clear()
            await scrape(source, emit)
            for event in emit.events:
                telemetry.observe(event)
            assert ('disk{mount="/"}' in telemetry[target.target]) == (gone < 2), gone
    assert telemetry[target.target]["load"] == 4


async def test_honor_labels_decides_whose_instance_and_job_win() -> None:
    """Exposed ``instance``/``job`` labels become ``exported_*`` and the target's win;
    with ``honor_labels`` the exposed ones are kept in the labels, but the topic always
    names the target (a target cannot speak for another host, nor put a wildcard in a
    topic) and two series differing only in their exposed instance stay two series."""
    async with MetricsTarget.serve() as target:
        target.body = ('pushed{instance="web-9",job="batch"} 1\n'
                       'load{instance="web-1"} 1\nload{instance="x/+/#"} 2\n')
        default, honored = Collector(), Collector()
        await scrape(ScrapeSource(config([target.target])), default)
        await scrape(ScrapeSource(config([target.target], honor_labels=True)), honored)
    (event,) = default.on(f"metrics/{target.target}/pushed")
    assert event.data["labels"] == {"instance": target.target, "job": "node",
                                    "exported_instance": "web-9", "exported_job": "batch"}
    assert {e.topic for e in honored.events} == {
        f"metrics/{target.target}/{name}" for name in ("pushed", "load", "up")}
    (event,) = honored.on(f"metrics/{target.target}/pushed")
    assert event.data["labels"] == {"instance": "web-9", "job": "batch"}
    assert event.key == target.target  # the target's telemetry, and its staleness
    assert event.headers["series"] == 'pushed{instance="web-9",job="batch"}'
    loads = honored.on(f"metrics/{target.target}/load")
    assert [e.data["value"] for e in loads] == [1, 2]
    assert len({e.id for e in loads}) == 2  # not one event id, one dropped as a duplicate


async def test_names_unfit_for_a_topic_are_dropped_and_max_series_counts_kept_ones(
        ) -> None:
    """A series whose (UTF-8 quoted) name holds ``/``, ``+``, ``#`` or a control character
    is dropped and logged with its count, never a topic level; ``max_series`` counts the
    series the name filters keep, so quoted names they drop never crowd the kept ones
    out (at most ``max_series`` of those are parsed, the rest counted as dropped)."""
    async with MetricsTarget.serve() as target:
        junk = "".join(f'{{"junk_{i}"}} 1\n' for i in range(50))
        target.body = ('{"node/load1+#"} 3\n{"node_load\u00011"} 4\nnode_load1 5\n'
                       f'{junk}node_load5 6\nnode_load15 7\n')
        emit = Collector()
        with capture_logs() as logs:
            await scrape(ScrapeSource(config([target.target], metrics=["node_*"],
                                             max_series=3)), emit)
    assert [e.topic.rsplit("/", 1)[1] for e in emit.events] == [
        "node_load1", "node_load5", "node_load15", "up"]
    assert all(e.topic.count("/") == 2 for e in emit.events)
    (line,) = [ln for ln in logs if ln["event"].startswith("scrape drops series whose name")]
    assert line["dropped"] == 2
    assert sample("loopd_events_rejected_total", source="node", reason="unsafe_name") == 2


async def test_a_huge_body_is_bounded_in_cpu_and_read_only_up_to_max_series() -> None:
    """A 335 kB gzip inflating to 60 MiB fails as too large by default (``max_payload``
    16 MiB); with a larger limit it is read up to ``max_series`` and the rest counted, in
    well under a second of CPU (it took 5 s when every line was read). The timeouts are
    long: what is bounded is CPU, and a busy machine must not turn too_large into timeout."""
    lines = 12 * 1024 * 1024  # "ab 1\n" each: 60 MiB
    slow = {"interval": "60s", "timeout": "50s"}
    async with MetricsTarget.serve(gzip=True, body="ab 1\n" * lines) as target:
        emit = Collector()
        await scrape(ScrapeSource(config([target.target], **slow)), emit)
        assert sample("loopd_scrape_failures_total", source="node", target=target.target,
                      reason="too_large") == 1
        source = ScrapeSource(config([target.target], max_payload=64 * 1024 * 1024,
                                     max_series=1000, **slow))
        emit = Collector()
        before = time.process_time()
        await scrape(source, emit)
        cpu = time.process_time() - before
    assert len(emit.on(f"metrics/{target.target}/ab")) == 1000
    assert sample("loopd_scrape_series_dropped_total", source="node",
                  target=target.target) == lines - 1000
    assert cpu < 1.5, cpu


async def test_a_nan_sample_is_absent_for_rates_and_staleness() -> None:
    """A NaN sample sends nothing and counts as absent: a counter's rate skips it (no
    false reset from comparing with NaN), and a series that stays NaN goes stale."""
    async with MetricsTarget.serve() as target:
        source = ScrapeSource(config([target.target], rate=["requests_*"]))
        emit = Collector()
        for value in ("100", "NaN", "160"):
            target.body = f"requests_total {value}\ngauge 1\n"
            await scrape(source, emit)
        for _ in range(2):
            target.body = "requests_total 170\ngauge NaN\n"
            await scrape(source, emit)
    ups = emit.on(f"metrics/{target.target}/up")
    (first, *rest) = emit.on(f"metrics/{target.target}/requests_total")
    assert first.data["value"] == pytest.approx(60 / (ups[2].time - ups[0].time))
    assert rest[0].data["value"] == pytest.approx(10 / (ups[3].time - ups[2].time))
    assert [e.headers.get("stale") for e in ups] == [None, None, None, None, "gauge"]


async def test_a_targets_own_up_is_kept_apart_from_the_synthesized_one() -> None:
    """A target that exposes ``up`` itself has it arrive as ``exported_up``: the
    synthesized ``up`` (1: the scrape worked) keeps its topic, field and id."""
    async with MetricsTarget.serve(body="up 0\n") as target:
        emit = Collector()
        await scrape(ScrapeSource(config([target.target])), emit)
    (up,) = emit.on(f"metrics/{target.target}/up")
    (exported,) = emit.on(f"metrics/{target.target}/exported_up")
    assert up.data["value"] == 1 and exported.data["value"] == 0
    assert up.id != exported.id and exported.headers["series"] == "exported_up"


async def test_openmetrics_is_filtered_before_its_parser_and_tabs_separate() -> None:
    """An OpenMetrics body goes through the name filters and ``max_series`` before its
    parser (100,000 dropped lines cost no parse), its kept counters keep their TYPE and
    exemplars; in the text format a tab separates a value as a space does."""
    junk = "".join(f'junk{{a="{i}"}} {i}\n' for i in range(100_000))
    om_body = ("# TYPE junk gauge\n" + junk + "# TYPE req counter\n# HELP req Requests.\n"
               'req_total{code="200"} 5 # {trace="t1"} 1\n# EOF\n')
    async with MetricsTarget.serve(content_type=OPENMETRICS, body=om_body) as om, \
            MetricsTarget.serve(body="node_load1\t3\nnode_load5\t4 1700000000000\n") as tab:
        source = ScrapeSource(config([om.target, tab.target],
                                     metrics=["req_*", "node_load*"]))
        emit = Collector()
        before = time.process_time()
        await scrape(source, emit)
        cpu = time.process_time() - before
    (req,) = emit.on(f"metrics/{om.target}/req_total")
    assert req.data == {"value": 5, "labels": {"code": "200", "instance": om.target,
                                               "job": "node"}}
    assert cpu < 0.5, cpu  # the whole body through the parser: about a second
    assert [e.data["value"] for e in emit.events if e.key == tab.target] == [3, 4, 1]
    assert emit.on(f"metrics/{tab.target}/node_load5")[0].time == 1700000000


VERIFY = """\
description: wait for the scraped load to come down
input:
  host: {type: string, required: true}
tasks:
  verify:
    confirm:
      event:
        source: node
        topic: "metrics/{{ ctx.host }}/load"
        if: "event.value < 1 and telemetry[event.key].load < 1"
      within: 60s
    next:
      - {when: succeeded, do: fixed}
  fixed: {succeed: fixed}
"""


async def test_daemon_fires_a_for_rule_on_scraped_telemetry_and_confirms_it(
        tmp_path: Path) -> None:
    """The real daemon scrapes the node exporter and a target whose load a test raises: a
    ``for: 1s`` rule reading ``event.value`` and the ``telemetry`` scope starts one run,
    whose confirm task waits until a later scrape shows the load down; the node exporter's
    node_load1 reaches a rule of its own meanwhile."""
    async with node_exporter() as exporter, MetricsTarget.serve() as target:
        target.set(load=9)
        cfg = Config(root=tmp_path)
        cfg.sources = [{"name": "node", "type": "scrape", "interval": "500ms",
                        "targets": [target.target, exporter.target],
                        "metrics": ["load", "node_load1"]}]
        cfg.rules = {"load.yaml": [
            {"name": "load-high", "on": {"source": "node", "topic": "metrics/{host}/load"},
             "if": "event.value > 5 and telemetry[event.key].load > 5",
             "key": "{{ vars.host }}", "for": "1s", "throttle": {"once_within": "10m"},
             "run": {"workflow": "scrape.verify", "input": {"host": "{{ vars.host }}"}}},
            {"name": "node-seen", "on": {"source": "node", "topic": "metrics/{host}/node_load1"},
             "if": "event.value >= 0", "key": "{{ vars.host }}",
             "throttle": {"once_within": "10m"},
             "run": {"action": "core.log", "input": {"message": "load {{ event.value }}"}}},
        ]}
        cfg.add_pack("scrape", {"pack.yaml": "name: scrape\nversion: 0.0.1\n"
                                             "description: the scrape test's workflow\n",
                                "workflows/verify.yaml": VERIFY})
        daemon = LoopdProcess(cfg)
        try:
            await daemon.start()
            runs = await daemon.wait_runs(2, timeout=30)
            by_rule = {r["rule"]: r for r in runs}
            assert set(by_rule) == {"load-high", "node-seen"}
            assert by_rule["node-seen"]["key"] == exporter.target
            run_id = str(by_rule["load-high"]["id"])
            await daemon.wait_run(run_id, lambda s: s["status"] == "waiting", timeout=30,
                                  what="the run to wait for evidence")
            target.set(load=0.2)
            story = await daemon.wait_run(run_id, lambda s: s["status"] == "succeeded",
                                          timeout=30, what="the scrape to confirm the fix")
            assert story["outcome"] == "fixed"
            assert len([r for r in await daemon.runs() if r["rule"] == "load-high"]) == 1
            assert await daemon.metric("loopd_source_up", source="node") == 1
        finally:
            await daemon.close()


async def test_close_ends_run_promptly_even_while_a_scrape_hangs() -> None:
    """The Source contract's lifecycle: ``connected`` while ``run`` runs, ``close()`` makes
    it return within seconds though a target holds its answer, and ``run`` on a closed
    source returns at once."""
    async with MetricsTarget.serve(delay=60.0, body="load 1\n") as target:
        source = ScrapeSource(config([target.target], interval="1s"))
        task = asyncio.create_task(source.run(Collector()))
        await wait_until(lambda: source.connected and target.requests >= 1, timeout=10,
                         what="a scrape in flight")
        await source.close()
        await asyncio.wait_for(task, 5)
        assert not source.connected
        await asyncio.wait_for(source.run(Collector()), 1)
