"""``type: promql`` sources against Debian's real Prometheus (tests/servers/prometheus.py),
which scrapes a ``/metrics`` target whose samples the tests change, and against the
in-process Prometheus API stand-in (tests/servers/http_targets.py) for the failures a
real server gives only with effort: a hang, a proxy's error page, a token to check.

A source alone runs under the real ``Supervisor`` into a collector that acks like the
engine; the closed loop (a rule's run starts, a resolution cancels it, a restart keeps
the incident) runs in a real ``Daemon`` on loopback with a SQLite store in tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from loopd import metrics
from loopd.config import PromQLSourceConfig, load_config
from loopd.daemon import Daemon
from loopd.events import Event
from loopd.sources.base import Supervisor
from loopd.sources.promql import KV_NAMESPACE, PromQLSource, fingerprint
from loopd.store.memory import MemoryStore
from tests.integration.test_guards_daemon import Api, _until_ready
from tests.integration.test_kafka_source import Collector
from tests.servers import free_port, require, wait_until
from tests.servers.http_targets import PrometheusApi
from tests.servers.prometheus import BINARY, MetricsTarget, Prometheus, running_prometheus

REPO = Path(__file__).resolve().parents[2]
LOAD = "loopd_test_load"
HIGH = f"{LOAD} > 0.9"


def config(url: str, *queries: dict[str, Any], expr: str = HIGH, **extra: Any
           ) -> PromQLSourceConfig:
    """A source named prom polling ``url`` every 200 ms: ``queries``, else one named
    high_load asking ``expr``."""
    return PromQLSourceConfig.model_validate({
        "type": "promql", "name": "prom", "url": url, "interval": 0.2,
        "queries": list(queries) or [{"name": "high_load", "expr": expr}], **extra})


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def own_metrics() -> Iterator[metrics.Metrics]:
    """Counters of this test only (no daemon installs any)."""
    with metrics.using(metrics.Metrics()) as m:
        yield m


@dataclass
class Scene:
    """The module's Prometheus and target, with a metric of this test's own."""

    prometheus: Prometheus
    load: str

    @property
    def target(self) -> MetricsTarget:
        return self.prometheus.target

    @property
    def url(self) -> str:
        return self.prometheus.url

    @property
    def high(self) -> str:
        return f"{self.load} > 0.9"

    async def wait_for(self, expr: str, present: bool = True) -> None:
        await self.prometheus.wait_for(expr, present)


@pytest.fixture(scope="module")
def shared_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One Prometheus for the module: each new one takes ~5 s to scrape for the first time."""
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as prom:
        yield prom


_METRICS = itertools.count(1)


@pytest.fixture
def prometheus(shared_prometheus: Prometheus) -> Iterator[Scene]:
    scene = Scene(shared_prometheus, f"loopd_test_load_{next(_METRICS)}")
    yield scene
    shared_prometheus.target.forget(scene.load)  # the next tests' scrapes stay small


@contextlib.asynccontextmanager
async def supervised(source: PromQLSource, collector: Collector) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(source, collector, min_backoff=0.05)
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        await supervisor.stop()
        await asyncio.wait_for(task, 10)


def of(collector: Collector, status: str, key: str | None = None) -> list[Event]:
    return [e for e in collector.events if e.data["status"] == status
            and (key is None or e.key == key)]


# -- the source alone, on the real Prometheus ------------------------------------------------

async def test_series_fire_each_round_and_a_series_that_leaves_resolves_once(
    prometheus: Scene, own_metrics: metrics.Metrics,
) -> None:
    """Each series over the threshold is a firing event per round on ``promql/<query>``
    keyed by its instance; one that goes back under it gives exactly one resolved event."""
    target = prometheus.target
    target.set(prometheus.load, 2.5, instance="web-1")
    target.set(prometheus.load, 0.1, instance="web-2")
    await prometheus.wait_for(prometheus.high)
    collector = Collector()
    # a second query that always has one series: one event per round, to count rounds
    source = PromQLSource(config(prometheus.url, {"name": "high_load", "expr": prometheus.high},
                                 {"name": "rounds", "expr": "up", "key_label": "job"}))

    def firing() -> list[Event]:
        return [e for e in of(collector, "firing") if e.topic == "promql/high_load"]

    def rounds() -> int:
        return sum(e.topic == "promql/rounds" for e in collector.events)

    async with supervised(source, collector) as sup:
        await wait_until(lambda: len(firing()) >= 3, timeout=20,
                         what="three rounds of firing events")
        first = firing()[0]
        assert (first.topic, first.key, first.source) == ("promql/high_load", "web-1", "prom")
        labels = {"__name__": prometheus.load, "instance": "web-1", "job": "target"}
        assert first.data == {"value": 2.5, "labels": labels, "status": "firing",
                              "fingerprint": fingerprint("prom", "high_load", labels)}
        assert {e.key for e in firing()} == {"web-1"}
        assert len({e.id for e in firing()}) == len(firing())  # one event per round
        assert sup.source.connected and sample("loopd_source_up", source="prom") == 1

        target.set(prometheus.load, 0.2, instance="web-1")
        await wait_until(lambda: len(of(collector, "resolved")) == 1, timeout=20,
                         what="the resolved event")
        (resolved,) = of(collector, "resolved")
        assert (resolved.key, resolved.data["value"], resolved.data["fingerprint"]) == (
            "web-1", None, first.data["fingerprint"])
        assert resolved.id == f"{first.data['fingerprint']}:{round(resolved.time * 1000)}" \
                              ":resolved"
        # quiet afterwards: three more rounds, and nothing fires or resolves again
        count, seen = len(firing()), rounds()
        await wait_until(lambda: rounds() >= seen + 3, timeout=20, what="three more rounds")
        assert len(firing()) == count and len(of(collector, "resolved")) == 1


async def test_two_replicas_make_the_same_events_with_the_same_ids(
    prometheus: Scene, own_metrics: metrics.Metrics,
) -> None:
    """Rounds are aligned to the clock, so two sources on one Prometheus (two replicas)
    make identical event ids for a round: the store decides each once."""
    prometheus.target.set(prometheus.load, 3.0, instance="db-1")
    await prometheus.wait_for(prometheus.high)
    one, two = Collector(), Collector()
    async with supervised(PromQLSource(config(prometheus.url, expr=prometheus.high)), one), \
            supervised(PromQLSource(config(prometheus.url, expr=prometheus.high)), two):
        await wait_until(lambda: len(one.events) >= 4 and len(two.events) >= 4, timeout=20,
                         what="rounds on both replicas")
    shared = {e.id for e in one.events} & {e.id for e in two.events}
    assert len(shared) >= 3, ([e.id for e in one.events], [e.id for e in two.events])


async def test_a_bad_query_is_counted_and_logged_while_the_others_go_on(
    prometheus: Scene, own_metrics: metrics.Metrics,
) -> None:
    """Bad PromQL: ``loopd_promql_errors_total{reason="bad_query"}`` and a log line with
    the query and Prometheus's own message; the good query's events keep coming;
    ``loopd_source_up`` says the last round was not all answered, but the source stays
    connected (Prometheus answers): one typo does not take the daemon out of /readyz."""
    prometheus.target.set(prometheus.load, 5.0, instance="web-1")
    await prometheus.wait_for(prometheus.high)
    collector = Collector()
    source = PromQLSource(config(prometheus.url, {"name": "high_load", "expr": prometheus.high},
                                 {"name": "typo", "expr": f"{prometheus.load} >> 1"}))
    with capture_logs() as logs:
        async with supervised(source, collector) as sup:
            await wait_until(lambda: sample("loopd_promql_errors_total", source="prom",
                                            query="typo", reason="bad_query") >= 2,
                             timeout=20, what="the bad query to be counted")
            await wait_until(lambda: len(collector.events) >= 2, timeout=20)
            assert not sup.failed and source.connected
            assert sample("loopd_source_up", source="prom") == 0
    assert {e.topic for e in collector.events} == {"promql/high_load"}
    failed = [e for e in logs if e["event"] == "promql query failed"]
    assert failed and failed[0]["query"] == "typo" and failed[0]["reason"] == "bad_query"
    assert "parse error" in failed[0]["error"], failed[0]
    assert own_metrics.source_errors["prom"][1].startswith("query typo: bad_query: ")


async def test_results_that_are_not_instant_vectors_are_refused_by_name(
    prometheus: Scene, own_metrics: metrics.Metrics,
) -> None:
    """A scalar, a string and a range vector are each a ``result_type`` error whose
    message names what came back; none becomes an event."""
    collector = Collector()
    queries = [{"name": "scalar", "expr": "1 + 1"}, {"name": "text", "expr": '"hello"'},
               {"name": "range", "expr": "up[10s]"}]
    with capture_logs() as logs:
        async with supervised(PromQLSource(config(prometheus.url, *queries)), collector):
            await wait_until(lambda: all(sample(
                "loopd_promql_errors_total", source="prom", query=q["name"],
                reason="result_type") >= 1 for q in queries), timeout=20,
                what="the three refusals")
    assert collector.events == []
    errors = {e["query"]: e["error"] for e in logs if e["event"] == "promql query failed"}
    assert "the result is a scalar, not an instant vector" in errors["scalar"]
    assert "the result is a string" in errors["text"]
    assert "the result is a range vector" in errors["range"]


async def test_series_without_the_key_label_are_rejected_not_events(
    prometheus: Scene, own_metrics: metrics.Metrics,
) -> None:
    """``sum(...)`` keeps no ``instance``: each series is counted in
    ``loopd_events_rejected_total{reason="no_key_label"}``, logged once a round, and
    never an event, while a query keyed by a label it keeps makes events."""
    prometheus.target.set(prometheus.load, 2.0, instance="web-1")
    await prometheus.wait_for(prometheus.high)
    collector = Collector()
    source = PromQLSource(config(
        prometheus.url, {"name": "total", "expr": f"sum({prometheus.load})"},
        {"name": "by_job", "expr": f"sum by (job) ({prometheus.load})", "key_label": "job"}))
    with capture_logs() as logs:
        async with supervised(source, collector):
            await wait_until(lambda: sample("loopd_events_rejected_total", source="prom",
                                            reason="no_key_label") >= 2, timeout=20)
            await wait_until(lambda: bool(collector.events), timeout=20)
    assert {(e.topic, e.key) for e in collector.events} == {("promql/by_job", "target")}
    line = next(e for e in logs if e["event"] == "promql series without the key label "
                                                  "rejected")
    assert (line["query"], line["key_label"], line["series"]) == ("total", "instance", 1)


async def test_an_unreachable_prometheus_is_counted_and_the_source_recovers(
    tmp_path: Path, own_metrics: metrics.Metrics,
) -> None:
    """Nothing listening: every round counts ``unreachable`` and the source keeps polling
    (the supervisor never restarts it); once Prometheus answers, events come."""
    require(BINARY is not None, "prometheus (Debian package prometheus)")
    target = MetricsTarget()
    target.start()
    target.set(LOAD, 4.0, instance="web-9")
    prometheus = Prometheus(tmp_path / "prometheus", target, port=free_port())
    collector = Collector()
    try:
        async with supervised(PromQLSource(config(prometheus.url)), collector) as sup:
            await wait_until(lambda: sample("loopd_promql_errors_total", source="prom",
                                            query="high_load", reason="unreachable") >= 2,
                             timeout=20, what="unreachable rounds")
            assert not sup.source.connected and not sup.failed
            assert sample("loopd_source_up", source="prom") == 0
            await asyncio.to_thread(prometheus.start)
            await wait_until(lambda: bool(collector.events), timeout=30,
                             what="events once Prometheus answers")
            await wait_until(lambda: sample("loopd_source_up", source="prom") == 1, timeout=5)
            assert sup.source.connected
    finally:
        await asyncio.to_thread(prometheus.stop)
        target.stop()
    assert collector.events[0].key == "web-9"


# -- failures only a stand-in gives easily -----------------------------------------------------

async def test_a_prometheus_that_hangs_times_out_and_the_round_after_answers(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
) -> None:
    """A query unanswered within ``timeout`` counts ``timeout``; the next round, answered,
    makes its events."""
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 7.0))
    prometheus_api.hang_next(1)
    collector = Collector()
    source = PromQLSource(config(prometheus_api.url, timeout=0.1))
    async with supervised(source, collector):
        await wait_until(lambda: bool(collector.events), timeout=20)
    assert sample("loopd_promql_errors_total", source="prom", query="high_load",
                  reason="timeout") == 1
    assert collector.events[0].data["value"] == 7.0


async def test_an_error_page_and_an_error_answer_change_nothing_for_the_series(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
) -> None:
    """A proxy's 502 page (``bad_response``) and an evaluation error (``query_failed``)
    are rounds without an answer: a series firing before is not resolved by them."""
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 7.0))
    collector = Collector()
    async with supervised(PromQLSource(config(prometheus_api.url)), collector) as sup:
        await wait_until(lambda: bool(collector.events), timeout=20)
        prometheus_api.set_vector(HIGH)  # gone, but Prometheus cannot say so for a while
        prometheus_api.fail_next(3, status=502, body="<html>Bad Gateway</html>")
        await wait_until(lambda: sample("loopd_promql_errors_total", source="prom",
                                        query="high_load", reason="bad_response") == 3,
                         timeout=20)
        prometheus_api.error = (422, "execution", "query processing would load too many "
                                                  "samples into memory")
        await wait_until(lambda: sample("loopd_promql_errors_total", source="prom",
                                        query="high_load", reason="query_failed") >= 1,
                         timeout=20)
        # Prometheus answered (with an error): connected, but the round was not all answered
        assert of(collector, "resolved") == [] and sup.source.connected
        assert sample("loopd_source_up", source="prom") == 0
        prometheus_api.error = None
        await wait_until(lambda: len(of(collector, "resolved")) == 1, timeout=20)


async def test_a_bearer_token_is_sent_and_never_logged(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``bearer_token_ref: env:VAR`` sends ``Authorization: Bearer <token>`` with every
    query; the token appears in no log line, even of a failed round."""
    token = "prom-token-5e4d3c2b1a"
    monkeypatch.setenv("LOOPD_TEST_PROM_TOKEN", token)
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 1.5))
    prometheus_api.fail_next(1, status=401, body=f"bad token: Bearer {token}")
    collector = Collector()
    with capture_logs() as logs:
        async with supervised(PromQLSource(config(
                prometheus_api.url, bearer_token_ref="env:LOOPD_TEST_PROM_TOKEN")), collector):
            await wait_until(lambda: bool(collector.events), timeout=20)
    assert prometheus_api.requests[0].headers["Authorization"] == f"Bearer {token}"
    assert sample("loopd_promql_errors_total", source="prom", query="high_load",
                  reason="bad_response") == 1
    assert token not in repr(logs)


async def test_basic_auth_reads_its_password_from_a_file(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics, tmp_path: Path,
) -> None:
    """``username`` + ``password_ref: file:...`` sends HTTP basic auth, the file read
    each round (a rotated password is picked up without a restart)."""
    secret = tmp_path / "prom-password"
    secret.write_text("first-pass\n")
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 1.5))
    collector = Collector()
    source = PromQLSource(config(prometheus_api.url, username="loopd",
                                 password_ref=f"file:{secret}"))
    async with supervised(source, collector):
        await wait_until(lambda: bool(collector.events), timeout=20)
        secret.write_text("second-pass\n")
        seen = len(prometheus_api.requests)
        await wait_until(lambda: len(prometheus_api.requests) > seen + 1, timeout=20)
    sent = {r.headers["Authorization"] for r in prometheus_api.requests}
    assert f"Basic {base64.b64encode(b'loopd:first-pass').decode()}" in sent
    assert f"Basic {base64.b64encode(b'loopd:second-pass').decode()}" in sent


async def test_close_returns_promptly_while_emit_is_blocked(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
) -> None:
    """An engine queue that never frees (emit blocks forever) does not keep ``stop()``
    from ending the source within seconds."""
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 1.5))
    blocked = asyncio.Event()

    async def stuck(delivery: Any) -> None:
        blocked.set()
        await asyncio.Event().wait()

    source = PromQLSource(config(prometheus_api.url))
    supervisor = Supervisor(source, stuck)
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(blocked.wait(), 20)
    await supervisor.stop()
    await asyncio.wait_for(task, 5)
    assert not supervisor.failed


async def test_the_firing_series_survive_a_restart_through_the_store(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
) -> None:
    """The series a query has firing are kept in the store: a new source on the same
    store resolves the one that left the result while it was down, and only once its
    resolved event was acked is it forgotten there."""
    store = MemoryStore()
    await store.open()
    try:
        await _restarts(store, prometheus_api)
    finally:
        await store.close()


async def _restarts(store: MemoryStore, prometheus_api: PrometheusApi) -> None:
    prometheus_api.set_vector(HIGH, ({"instance": "web-1"}, 2.0), ({"instance": "web-2"}, 3.0))
    collector = Collector()
    async with supervised(PromQLSource(config(prometheus_api.url), store), collector):
        await wait_until(lambda: {e.key for e in collector.events} == {"web-1", "web-2"},
                         timeout=20)
    saved = await store.kv_get(KV_NAMESPACE, "prom")
    assert {s["key"] for s in saved["high_load"].values()} == {"web-1", "web-2"}

    prometheus_api.set_vector(HIGH, ({"instance": "web-2"}, 3.0))  # web-1 fixed meanwhile
    unacked = Collector(should_ack=lambda e: e.data["status"] != "resolved")
    async with supervised(PromQLSource(config(prometheus_api.url), store), unacked):
        await wait_until(lambda: len(of(unacked, "resolved")) >= 2, timeout=20,
                         what="the resolved event, repeated while not acked")
    first, again = of(unacked, "resolved")[:2]
    assert first.key == "web-1" and first.id == again.id  # the same event until decided
    saved = await store.kv_get(KV_NAMESPACE, "prom")
    assert saved["high_load"][first.data["fingerprint"]]["resolved_at"] == first.time

    acked = Collector()
    async with supervised(PromQLSource(config(prometheus_api.url), store), acked):
        await wait_until(lambda: of(acked, "resolved") != [], timeout=20)
        assert of(acked, "resolved")[0].id == first.id  # after a crash: the same id again

        async def forgotten() -> bool:
            saved = await store.kv_get(KV_NAMESPACE, "prom")
            return {s["key"] for s in saved["high_load"].values()} == {"web-2"}

        await wait_until(forgotten, timeout=20, what="web-1 to leave the stored series")


# -- the closed loop in a daemon -----------------------------------------------------------------

RULES = """\
rules:
  - name: shed-load
    on: {source: prom, topic: promql/high_load}
    key: "{{ event.labels.instance }}"
    mode: approval
    approval: {within: 1h}
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


@contextlib.asynccontextmanager
async def daemon(root: Path, prometheus: Scene) -> AsyncIterator[Api]:
    """A daemon with one promql source on ``prometheus`` (its ``high`` query) and the
    approval rule above."""
    (root / "rules").mkdir(parents=True, exist_ok=True)
    (root / "rules" / "rules.yaml").write_text(RULES)
    if not (root / "packs" / "core").exists():
        shutil.copytree(REPO / "packs" / "core", root / "packs" / "core")
    (root / "loopd.yaml").write_text(f"""\
listen: 127.0.0.1:0
sources:
  - name: prom
    type: promql
    url: {prometheus.url}
    interval: 500ms
    queries: [{{name: high_load, expr: '{prometheus.high}', key_label: instance}}]
rules: [rules]
packs: [packs]
store: {{path: var/loopd.db}}
""")
    loopd = Daemon(load_config(root / "loopd.yaml"))
    assert [str(e) for e in loopd.engine.ruleset.errors] == []
    ready = asyncio.Event()
    task = await _until_ready(loopd.run(on_ready=lambda _: ready.set()), ready)
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{loopd.port}") as http:
            with metrics.using(loopd.metrics):
                yield Api(loopd, http)
    finally:
        loopd.stop()
        await asyncio.wait_for(task, 20)


async def decisions(api: Api, run_id: str) -> list[str]:
    return [d["outcome"] for d in (await api.run(run_id))["decisions"]]


async def test_a_rule_on_a_query_runs_when_the_metric_crosses_and_its_resolution_cancels(
    prometheus: Scene, tmp_path: Path,
) -> None:
    """The target's metric over the threshold starts a run of the rule on
    ``promql/high_load`` for that instance; back under it, the resolved event cancels the
    run, which had not acted yet (awaiting approval), as a resolved alert would."""
    target = prometheus.target
    target.set(prometheus.load, 0.3, instance="web-1")
    async with daemon(tmp_path / "site", prometheus) as api:
        await wait_until(lambda: sample("loopd_source_up", source="prom") == 1, timeout=20)
        assert await api.runs("shed-load") == []
        target.set(prometheus.load, 1.7, instance="web-1")
        (run,) = await api.wait_runs("shed-load", 1)
        assert (run["key"], run["status"]) == ("web-1", "awaiting_approval")
        await wait_until(lambda: _joined(api, run["id"]), timeout=20,
                         what="later rounds to join the incident")
        target.set(prometheus.load, 0.3, instance="web-1")
        story = await api.wait_status(run["id"], "cancelled")
        assert story["reason"].startswith("alert resolved (") and \
            story["reason"].endswith(":resolved) before the run acted"), story["reason"]
        assert story["steps"] == []
        _, body = await api.get("/v1/incidents?status=open")
        assert body["incidents"] == []
        assert len(await api.runs("shed-load")) == 1


async def _joined(api: Api, run_id: str) -> bool:
    return (await decisions(api, run_id)).count("joined") >= 2


async def test_after_a_restart_firing_joins_the_incident_and_resolved_while_down_cancels(
    prometheus: Scene, tmp_path: Path,
) -> None:
    """Restarted while the series still fires: its events join the open incident (no
    second run). Restarted after it went back under the threshold while loopd was down:
    the first round resolves it from the stored firing set and cancels the waiting run."""
    target = prometheus.target
    target.set(prometheus.load, 1.7, instance="web-1")
    site = tmp_path / "site"
    async with daemon(site, prometheus) as api:
        (run,) = await api.wait_runs("shed-load", 1)
    async with daemon(site, prometheus) as api:
        before = (await decisions(api, run["id"])).count("joined")
        await wait_until(lambda: _more_joined(api, run["id"], before), timeout=20,
                         what="rounds after the restart to join the incident")
        assert len(await api.runs("shed-load")) == 1
        assert (await api.run(run["id"]))["status"] == "awaiting_approval"
    target.set(prometheus.load, 0.2, instance="web-1")
    await prometheus.wait_for(prometheus.high, present=False)
    async with daemon(site, prometheus) as api:
        story = await api.wait_status(run["id"], "cancelled")
        assert story["reason"].endswith(":resolved) before the run acted")
        assert len(await api.runs("shed-load")) == 1


async def _more_joined(api: Api, run_id: str, before: int) -> bool:
    return (await decisions(api, run_id)).count("joined") > before


async def test_a_result_past_max_series_keeps_the_same_series_each_round(
    prometheus_api: PrometheusApi, own_metrics: metrics.Metrics,
) -> None:
    """A query answering 50 series with ``max_series: 10``: 10 series fire, the same 10
    every round (none flaps to resolved), the other 40 are counted as rejected
    (``reason="max_series"``) and logged."""
    prometheus_api.set_vector(HIGH, *(({"instance": f"web-{i}"}, 1.0) for i in range(50)))
    collector = Collector()
    with capture_logs() as logs:
        async with supervised(PromQLSource(config(prometheus_api.url, max_series=10)),
                              collector):
            await wait_until(lambda: sample("loopd_events_rejected_total", source="prom",
                                            reason="max_series") >= 120,
                             timeout=20, what="three rounds past max_series")
    firing = {e.key for e in of(collector, "firing")}
    assert len(firing) == 10 and of(collector, "resolved") == []
    assert any(e["event"].startswith("promql result exceeds max_series") and
               e["dropped"] == 40 for e in logs)
