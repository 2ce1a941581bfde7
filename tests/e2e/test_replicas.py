"""Two ``loopd run`` processes on one store: the store, not either process's memory,
decides, so an alert posted to both is acted on once."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import LOOPD, Config, eventually, store_query
from tests.e2e.test_alertmanager import alert, notification
from tests.servers.http_targets import HttpEcho
from tests.servers.postgres import USER, PostgresServer

pytestmark = pytest.mark.e2e


def _config(config: Config, echo: HttpEcho, **rule: Any) -> Config:
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.rules = {"alerts.yaml": [{
        "name": "restart-nginx",
        "on": {"source": "alertmanager", "match": {"status": "firing",
                                                   "labels.alertname": "NginxDown"}},
        "key": "{{ event.labels.instance }}",
        "run": {"action": "http.request", "input": {
            "method": "POST", "url": f"{echo.url}/echo",
            "json": {"restart": "nginx", "host": "{{ key }}"}}},
        **rule,
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


async def test_a_fleet_budget_holds_across_two_replicas(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """A fleet budget of 3 runs per hour, alerts for 10 hosts posted to two replicas in
    turn: 3 runs in all, not 3 per replica; the other decisions are suppressed and say
    which guard (the store counted what both replicas admitted)."""
    config.extra["guards"] = {"max_runs": {"count": 3, "per": "1h"}}
    _config(config, http_echo)
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    for i in range(10):
        await (a if i % 2 else b).post("/v1/alertmanager",
                                       notification(alert("NginxDown", f"web-{i}")))
    await eventually(lambda: store_query(config.store, "SELECT COUNT(*) FROM decisions")[0][0]
                     == 10, what="ten decisions")
    await eventually(lambda: len(http_echo.requests) >= 3, what="three actions")
    await a.stop()
    await b.stop()
    assert len(http_echo.requests) == 3
    assert store_query(config.store, "SELECT COUNT(*) FROM runs")[0][0] == 3
    suppressed = store_query(config.store, "SELECT reason FROM decisions WHERE "
                             "outcome='suppressed'")
    assert len(suppressed) == 7
    assert all("fleet budget of 3 runs" in reason for (reason,) in suppressed), suppressed
    assert any("counted across replicas" in reason for (reason,) in suppressed), suppressed


async def test_approve_and_cancel_on_the_replica_that_does_not_execute_the_run(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """Runs waiting for approval on replica a are approved (and cancelled) through replica
    b's API: b hands the command to a through the store; the approver is on the run."""
    _config(config, http_echo, mode="approval")
    config.extra["store"] = {"path": "var/loopd.db", "poll": "200ms"}
    config.write()
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    for host in ("web-1", "web-2"):
        await a.post("/v1/alertmanager", notification(alert("NginxDown", host)))
    waiting = await b.wait_runs(2, status="awaiting_approval")
    by_host = {r["key"]: r for r in waiting}
    assert {r["owner"] for r in waiting} == {"a"}  # b lists them: the store is the cluster's
    approved = by_host["web-1"]["id"]
    await b.post(f"/v1/runs/{approved}/approve?reason=checked", expect=202)
    await b.wait_run(approved, lambda r: r["status"] == "succeeded", timeout=20)
    cancelled = by_host["web-2"]["id"]
    answer = await b.post(f"/v1/runs/{cancelled}/cancel", expect=202)
    assert answer["status"] == "cancelling"
    await a.wait_run(cancelled, lambda r: r["status"] == "cancelled", timeout=20)
    run = await a.run(approved)
    assert run["context"]["approved"]["reason"] == "checked"
    assert [i["action"] for i in run["interventions"]] == ["approve"]  # audited on b, seen on a
    await a.stop()
    await b.stop()
    assert [r.json["host"] for r in http_echo.requests] == ["web-1"]


CONFIRMED_RESTART = """\
input:
  host: {type: string, required: true}
tasks:
  restart:
    action: http.request
    input: {method: POST, url: "%s/echo", json: {restart: nginx, host: "{{ ctx.host }}"}}
    next: [{when: succeeded, do: verify}]
  verify:
    confirm:
      event:
        source: alertmanager
        match: {status: resolved, labels.alertname: NginxDown, labels.instance: "{{ ctx.host }}"}
      within: 60s
    next:
      - {when: succeeded, do: fixed}
      - {when: failed, do: broken}
      - {when: inconclusive, do: broken}
  fixed: {succeed: fixed}
  broken: {fail: not fixed}
"""


async def test_evidence_posted_to_another_replica_confirms_the_fix(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """The run waits on replica a for the resolved alert; Alertmanager's resolved
    notification reaches replica b (a Service spreads posts): b stores it, a's confirm task
    reads it from the store, and the run ends fixed."""
    config.add_pack("e2e", {
        "pack.yaml": "name: e2e\nversion: 0.0.1\ndescription: replica tests\n",
        "workflows/restart.yaml": CONFIRMED_RESTART % http_echo.url,
    })
    _config(config, http_echo)
    config.rules["alerts.yaml"][0]["run"] = {"workflow": "e2e.restart",
                                             "input": {"host": "{{ key }}"}}
    config.extra["store"] = {"path": "var/loopd.db", "poll": "200ms"}
    config.write()
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    await eventually(lambda: len(store_query(config.store, "SELECT name FROM replicas")) == 2,
                     what="both replicas registered")
    await asyncio.sleep(0.6)  # a poll or two: each sees the other alive
    await a.post("/v1/alertmanager", notification(alert("NginxDown", "web-1")))
    (run,) = await a.wait_runs(1)
    await eventually(lambda: len(http_echo.requests) == 1, what="the restart")
    await a.wait_run(run["id"], lambda r: r["status"] == "waiting", timeout=20)
    await b.post("/v1/alertmanager", notification(alert("NginxDown", "web-1",
                                                        status="resolved")))
    done = await a.wait_run(run["id"], lambda r: r["status"] not in ("running", "waiting"),
                            timeout=30)
    await a.stop()
    await b.stop()
    assert (done["status"], done["outcome"]) == ("succeeded", "fixed"), done
    assert done["owner"] == "a"


async def test_a_resolved_alert_posted_to_another_replica_cancels_the_unstarted_run(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """The run waits for approval on replica a; the alert's resolution reaches replica b:
    the run is cancelled as it would be on one daemon, and nothing acts (found in review:
    it stayed waiting, and ran once approved)."""
    _config(config, http_echo, mode="approval")
    config.extra["store"] = {"path": "var/loopd.db", "poll": "200ms"}
    config.write()
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    await asyncio.sleep(0.6)  # a poll or two: each sees the other alive
    await a.post("/v1/alertmanager", notification(alert("NginxDown", "web-1")))
    (run,) = await b.wait_runs(1, status="awaiting_approval")
    await b.post("/v1/alertmanager", notification(alert(
        "NginxDown", "web-1", status="resolved", ends="2026-11-23T03:05:00Z")))
    done = await a.wait_run(run["id"], lambda r: r["status"] == "cancelled", timeout=20)
    await a.stop()
    await b.stop()
    assert "alert resolved" in (done["reason"] or ""), done
    assert http_echo.requests == []


async def test_a_reload_asked_of_one_replica_reloads_the_others(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho) -> None:
    """POST /v1/reload on replica a: a reloads at once, b within a poll (each reads its
    own files: here, the same rules folder with a second rule)."""
    _config(config, http_echo)
    config.extra["store"] = {"path": "var/loopd.db", "poll": "200ms"}
    config.write()
    a = loopd_factory(config, env={"LOOPD_REPLICA": "a"})
    b = loopd_factory(config, env={"LOOPD_REPLICA": "b"})
    await asyncio.gather(a.start(), b.start())
    second = dict(config.rules["alerts.yaml"][0], name="restart-apache")
    config.write_rules("more.yaml", [second])
    answer = await a.post("/v1/reload")
    assert answer["rules"] == 2

    async def reloaded() -> bool:
        return len((await b.get("/v1/rules"))["rules"]) == 2

    await eventually(reloaded, what="b to reload")
    await a.stop()
    await b.stop()


async def test_the_postgres_dsns_password_appears_nowhere(
        config: Config, loopd_factory: Factory, http_echo: HttpEcho,
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """A daemon on the Postgres store, its DSN (with a password) by file: reference, runs
    and answers: the password is in no log line, no API answer, no metric, nothing the
    store holds, and not in `loopd check`'s output."""
    password = "PgLeak-dsn-7d3e91c4"
    host, database = postgres_dsn.split("@", 1)[1].rsplit("/", 1)
    dsn_file = config.root / "pg-dsn"
    dsn_file.write_text(f"postgresql://{USER}:{password}@{host}/{database}\n")
    _config(config, http_echo)
    config.extra["store"] = {"type": "postgres", "dsn": f"file:{dsn_file}"}
    config.write()
    daemon = loopd_factory(config, env={"LOOPD_REPLICA": "pg-1"})
    await daemon.start()
    await daemon.post("/v1/alertmanager", notification(alert("NginxDown", "web-1")))
    (run,) = await daemon.wait_runs(1)
    done = await daemon.wait_run(run["id"], lambda r: r["status"] == "succeeded")
    seen = [orjson.dumps(done)]
    for path in ("/v1/runs", "/v1/incidents", "/v1/rules", "/v1/guards", "/readyz",
                 "/healthz", "/metrics", "/v1/audit"):
        _, body = await daemon.request("GET", path)
        seen.append(body.encode() if isinstance(body, str) else orjson.dumps(body))
    await daemon.stop()
    texts = {"api": b"".join(seen), "logs": b"".join(log.read_bytes() for log in daemon.logs),
             "store": await _output(str(postgres_server.bin / "pg_dump"), "-h", "127.0.0.1",
                                    "-p", str(postgres_server.port), "-U", USER, database),
             "check": await _output(str(LOOPD), "check", "-c", str(config.path))}
    assert len(http_echo.requests) == 1  # it really ran on the store
    assert {where for where, text in texts.items() if password.encode() in text} == set()


async def _output(*command: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out
