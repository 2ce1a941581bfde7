"""Two ``loopd run`` processes on one store: the store, not either process's memory,
decides, so an alert posted to both is acted on once."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, eventually, store_query
from tests.e2e.test_alertmanager import alert, notification
from tests.servers.http_targets import HttpEcho

pytestmark = pytest.mark.e2e


def _config(config: Config, echo: HttpEcho) -> Config:
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.rules = {"alerts.yaml": [{
        "name": "restart-nginx",
        "on": {"source": "alertmanager", "match": {"status": "firing",
                                                   "labels.alertname": "NginxDown"}},
        "key": "{{ event.labels.instance }}",
        "run": {"action": "http.request", "input": {
            "method": "POST", "url": f"{echo.url}/echo",
            "json": {"restart": "nginx", "host": "{{ key }}"}}},
    }]}
    config.write()
    return config


async def test_two_processes_on_one_store_act_once_on_one_alert(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """The same Alertmanager alert posted to two daemons sharing one SQLite store yields
    exactly one decision, one incident, one run and one action, whichever answers first."""
    _config(config, http_echo)
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    payload = notification(alert("NginxDown", "web-1"))
    replies = await asyncio.gather(a.post("/v1/alertmanager", payload),
                                   b.post("/v1/alertmanager", payload))
    assert all(r["accepted"] == 1 for r in replies), replies
    await eventually(lambda: len(http_echo.requests) >= 1, what="the action")
    await eventually(lambda: store_query(config.store, "SELECT COUNT(*) FROM runs "
                                         "WHERE status='succeeded'")[0][0] == 1,
                     what="the run to end")
    # a second notification for the same alert, later, to both: still nothing new
    await asyncio.gather(a.post("/v1/alertmanager", payload),
                         b.post("/v1/alertmanager", payload))
    await a.stop()
    await b.stop()
    assert len(http_echo.requests) == 1
    assert store_query(config.store, "SELECT rule, outcome FROM decisions") == [
        ("restart-nginx", "run_created")]
    assert store_query(config.store, "SELECT COUNT(*) FROM incidents")[0][0] == 1
    assert store_query(config.store, "SELECT COUNT(*) FROM runs")[0][0] == 1


async def test_a_second_process_under_a_live_replica_name_is_refused(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """Two processes under one replica name would both think they own the same runs: the
    second one does not start and says why."""
    _config(config, http_echo)
    a = loopd_factory(config, env={"LOOPD_REPLICA": "same"})
    await a.start()
    b = loopd_factory(config, env={"LOOPD_REPLICA": "same"})
    with pytest.raises(Exception, match="in use by a live loopd"):
        await b.start(timeout=15)
    await a.stop()
