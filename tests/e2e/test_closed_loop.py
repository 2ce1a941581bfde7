"""The closed loop, end to end: telemetry -> rule -> SSH remediation -> confirmation from
telemetry -> outcome (fixed, or escalated to a ServiceNow incident), through the real
daemon, a real MQTT broker, an SSH server and a ServiceNow-like Table API on loopback."""

from __future__ import annotations

import time
from typing import Any

import aiomqtt
import orjson
import pytest

from loopd.units import parse_time
from tests.e2e.conftest import Factory
from tests.e2e.daemon import SHIPPED_PACKS, Config, LoopdProcess, eventually
from tests.e2e.test_mqtt import mqtt_client, mqtt_source, publish
from tests.servers.http_targets import ServiceNow
from tests.servers.kafka import KafkaBroker, create_topic, read_topic
from tests.servers.mqtt import MqttBroker
from tests.servers.ssh import PASSWORD, USER, SshServer

pytestmark = pytest.mark.e2e

SSH_PASSWORD_ENV = "E2E_SSH_PASSWORD"
SN_PASSWORD_ENV = "E2E_SERVICENOW_PASSWORD"
RULE = "restart-unhealthy-service"
HEALTH = "telemetry/web-1/service/nginx"
RESTART = "systemctl restart nginx"


def fast_restart_and_verify(config: Config, within: str) -> str:
    """The shipped ``linux.restart_and_verify``, with ``within`` instead of its 3 minutes
    (a test pack ``e2e``): same tasks, same transitions, a shorter wait."""
    text = (SHIPPED_PACKS / "linux" / "workflows" / "restart_and_verify.yaml").read_text()
    assert text.count("within: 3m") == 2
    config.add_pack("e2e", {
        "pack.yaml": "name: e2e\nversion: 0.0.1\ndescription: workflows of the e2e tests\n",
        "workflows/restart_and_verify.yaml": text.replace("within: 3m", f"within: {within}"),
    })
    return "e2e.restart_and_verify"


def closed_loop(config: Config, ssh: SshServer, workflow: str = "linux.restart_and_verify",
                source: str = "telemetry") -> dict[str, str]:
    """Inventory, credentials and the remediation rule; returns the daemon's environment."""
    config.entities = {"web-1": ssh.entity(role="web")}
    config.credentials = {"ssh-ops": {"username": USER, "password": f"env:{SSH_PASSWORD_ENV}"}}
    config.rules = {"services.yaml": [{
        "name": RULE,
        "on": {"source": source, "topic": "telemetry/{host}/service/{service}"},
        "if": "not (event.status == 'ok' or event.healthy == true)",
        "key": "{{ vars.host }}",
        "throttle": {"once_within": "10m"},
        "run": {"workflow": workflow,
                "input": {"host": "{{ vars.host }}", "service": "{{ vars.service }}"}},
    }]}
    return {SSH_PASSWORD_ENV: PASSWORD}


def escalation(config: Config, servicenow: ServiceNow) -> dict[str, str]:
    """A rule on loopd's own outcome events: a run that did not fix it opens an incident."""
    config.pack_config["servicenow"] = {"instance": servicenow.url, "credentials": "servicenow"}
    config.credentials["servicenow"] = {"username": servicenow.username,
                                        "password": f"env:{SN_PASSWORD_ENV}"}
    config.rules["escalation.yaml"] = [{
        "name": "escalate-unfixed",
        "on": {"source": "loopd", "match": {"rule": RULE,
                                            "outcome": ["not_fixed", "inconclusive", "failed"]}},
        "key": "{{ event.key }}",
        "run": {"workflow": "servicenow.escalate", "input": {
            "short_description": "{{ event.workflow }} did not fix {{ event.key }}",
            "cmdb_ci": "{{ event.key }}", "urgency": "1",
            "notes": "Run {{ event.run }} ended {{ event.outcome }}: {{ event.reason }}"}},
    }]
    return {SN_PASSWORD_ENV: servicenow.password}


def task_of(story: dict[str, Any], task: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [s for s in story["steps"] if s["task"] == task]
    (step,) = steps
    return step


async def waiting_in(daemon: LoopdProcess, run_id: str, task: str) -> dict[str, Any]:
    """Wait until the run waits in confirm task ``task``; return its story."""
    return await daemon.wait_run(
        run_id, lambda s: s["status"] == "waiting" and any(
            st["task"] == task and st["status"] == "running" for st in s["steps"]),
        what=f"the run to wait in {task}")


async def the_run(daemon: LoopdProcess, rule: str = RULE) -> str:
    runs = [r for r in await daemon.wait_runs(1) if r["rule"] == rule]
    assert len(runs) == 1, runs
    return str(runs[0]["id"])


@pytest.mark.mqtt
async def test_unhealthy_service_is_restarted_once_and_confirmed_fixed(
        mqtt_broker: MqttBroker, ssh_server: SshServer, config: Config,
        loopd_factory: Factory) -> None:
    """Telemetry saying nginx on web-1 is down starts linux.restart_and_verify, which restarts
    it over SSH exactly once, then waits; healthy telemetry ends the run succeeded/fixed and
    GET /v1/runs/{id} shows every step with its transition."""
    config.sources = [mqtt_source(mqtt_broker)]
    daemon = loopd_factory(config, env=closed_loop(config, ssh_server))
    await daemon.start()

    await publish(mqtt_broker, [(HEALTH, {"status": "failed", "since": "03:58:00"})])
    run_id = await the_run(daemon)
    await waiting_in(daemon, run_id, "verify")
    assert ssh_server.host.count(RESTART) == 1
    assert ssh_server.host.services["nginx"] == "active"
    # still unhealthy in between: joins the open incident, starts nothing
    await publish(mqtt_broker, [(HEALTH, {"status": "failed"})])
    await publish(mqtt_broker, [(HEALTH, {"status": "ok"})])

    story = await daemon.wait_run(run_id, lambda s: s["status"] == "succeeded",
                                  what="the run to succeed")
    assert story["outcome"] == "fixed" and story["workflow"] == "linux.restart_and_verify"
    assert [(s["task"], s["status"]) for s in story["steps"]] == [
        ("restart", "succeeded"), ("verify", "succeeded"), ("fixed", "succeeded")]
    restart = task_of(story, "restart")
    assert restart["action"] == "linux.restart_service" and restart["attempt"] == 1
    assert restart["input"] == {"host": "web-1", "service": "nginx"}
    assert restart["output"]["command"] == "sudo -n systemctl restart -- nginx"
    assert restart["output"]["exit_status"] == 0
    assert restart["transition"] == "verify (when succeeded)"
    verify = task_of(story, "verify")
    assert verify["output"]["evidence"] == "event"
    assert verify["output"]["event"]["data"] == {"status": "ok"}
    assert verify["transition"] == "fixed (when succeeded)"
    assert story["trigger"]["topic"] == HEALTH
    assert story["input"] == {"host": "web-1", "service": "nginx"}
    assert [e["outcome"] for e in story["decisions"]] == ["run_created", "joined"]
    assert ssh_server.host.count(RESTART) == 1
    assert await daemon.metric("loopd_run_outcomes_total", workflow="linux.restart_and_verify",
                               outcome="fixed") == 1
    assert PASSWORD not in daemon.log.read_text() + orjson.dumps(story).decode()
    await daemon.stop()


@pytest.mark.mqtt
async def test_service_that_never_recovers_is_escalated_to_servicenow_with_the_history(
        mqtt_broker: MqttBroker, ssh_server: SshServer, servicenow: ServiceNow,
        config: Config, loopd_factory: Factory) -> None:
    """When telemetry keeps saying the service is down, the workflow restarts it a second
    time, ends not_fixed, and the outcome event opens one ServiceNow incident whose work
    notes carry the run's history."""
    workflow = fast_restart_and_verify(config, "2s")
    config.sources = [mqtt_source(mqtt_broker)]
    env = closed_loop(config, ssh_server, workflow) | escalation(config, servicenow)
    daemon = loopd_factory(config, env=env)
    await daemon.start()

    await publish(mqtt_broker, [(HEALTH, {"status": "failed"})])
    run_id = await the_run(daemon)
    await waiting_in(daemon, run_id, "verify")
    await publish(mqtt_broker, [(HEALTH, {"status": "failed"})])  # evidence against
    await waiting_in(daemon, run_id, "reverify")
    await publish(mqtt_broker, [(HEALTH, {"healthy": False})])
    story = await daemon.wait_run(run_id, lambda s: s["finished"] is not None,
                                  what="the remediation run to end")
    assert (story["status"], story["outcome"]) == ("failed", "not_fixed")
    assert [(s["task"], s["status"]) for s in story["steps"]] == [
        ("restart", "succeeded"), ("verify", "failed"), ("restart_again", "succeeded"),
        ("reverify", "failed"), ("escalate", "failed")]
    assert task_of(story, "verify")["transition"] == "restart_again (when failed)"
    assert task_of(story, "verify")["output"]["last_evidence"]["data"] == {"status": "failed"}
    assert ssh_server.host.count(RESTART) == 2
    assert story["reason"].startswith("nginx on web-1 is not fixed by loopd. What happened:")

    escalated = await daemon.wait_runs(1, status="succeeded")
    (ticket_run,) = [r for r in escalated if r["rule"] == "escalate-unfixed"]
    ticket = await daemon.run(ticket_run["id"])
    assert ticket["outcome"] == "done" and ticket["key"] == "web-1"
    (incident,) = servicenow.incidents
    assert incident["short_description"] == f"{workflow} did not fix web-1"
    assert incident["cmdb_ci"] == "web-1" and incident["urgency"] == "1"
    assert ticket["context"]["incident_number"] == incident["number"]
    (notes,) = servicenow.notes(incident["sys_id"])
    assert f"Run {run_id} ended not_fixed" in notes
    for line in ("restart: succeeded -> verify", "verify: failed (not fixed:",
                 "restart_again: succeeded -> reverify", "reverify: failed",
                 "-> escalate"):
        assert line in notes, f"{line!r} not in the work notes:\n{notes}"
    seen = [r for r in servicenow.requests if r.path == "/api/now/table/incident"]
    assert len(seen) == 1  # one incident, one request
    assert SN_PASSWORD_ENV not in notes and servicenow.password not in daemon.log.read_text()
    await daemon.stop()


async def test_run_killed_while_waiting_resumes_with_its_original_deadline(
        ssh_server: SshServer, servicenow: ServiceNow, config: Config,
        loopd_factory: Factory) -> None:
    """A run waiting for confirmation when loopd is killed -9 resumes after the restart
    without repeating its restart, and its confirmation ends at the deadline persisted
    before the kill, not a new one counted from the restart."""
    within = 3.0
    workflow = fast_restart_and_verify(config, f"{within}s")
    config.sources = [{"name": "webhook", "type": "webhook"}]
    env = closed_loop(config, ssh_server, workflow, source="webhook")
    daemon = loopd_factory(config, env=env)
    await daemon.start()

    await daemon.post("/v1/events", {"topic": HEALTH, "data": {"status": "failed"}})
    run_id = await the_run(daemon)
    await waiting_in(daemon, run_id, "verify")
    ((progress,),) = daemon.store_query("SELECT progress FROM runs WHERE id=?", (run_id,))
    deadline = orjson.loads(progress)["tasks"]["verify"]["deadline"]
    await daemon.kill()
    assert deadline > time.time()  # killed while it waits
    # stay down past the deadline: the restarted daemon must not grant a new 3 s
    await eventually(lambda: time.time() > deadline + 0.5, "the deadline to pass", within + 5)

    await daemon.start()
    restarted = time.time()
    story = await daemon.wait_run(run_id, lambda s: s["finished"] is not None,
                                  what="the resumed run to end")
    verify = task_of(story, "verify")
    assert verify["status"] == "inconclusive"
    assert verify["error"] == f"no evidence within {within:g}s"
    assert parse_time(verify["finished"]) < restarted + within / 2, \
        "waited anew after the restart"
    assert (story["status"], story["outcome"]) == ("failed", "inconclusive")
    assert [s["task"] for s in story["steps"]] == ["restart", "verify", "escalate"]
    assert verify["transition"] == "escalate (when inconclusive)"
    assert "run: resumed after a restart" in story["reason"]
    assert ssh_server.host.count(RESTART) == 1  # the restart is not done again
    await daemon.stop()


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
async def test_run_stopped_while_waiting_is_fixed_by_evidence_after_the_restart(
        stop: str, ssh_server: SshServer, config: Config, loopd_factory: Factory) -> None:
    """A run waiting for confirmation when loopd is killed -9 or stopped (SIGTERM, exit 0)
    waits again after the restart, until its persisted deadline, and healthy telemetry sent
    then ends it fixed without a second restart."""
    workflow = fast_restart_and_verify(config, "60s")
    config.sources = [{"name": "webhook", "type": "webhook"}]
    daemon = loopd_factory(config, env=closed_loop(config, ssh_server, workflow, "webhook"))
    await daemon.start()
    await daemon.post("/v1/events", {"topic": HEALTH, "data": {"status": "failed"}})
    run_id = await the_run(daemon)
    await waiting_in(daemon, run_id, "verify")
    ((progress,),) = daemon.store_query("SELECT progress FROM runs WHERE id=?", (run_id,))
    deadline = orjson.loads(progress)["tasks"]["verify"]["deadline"]
    if stop == "sigterm":
        await daemon.stop()
        assert daemon.store_query("SELECT status FROM runs WHERE id=?", (run_id,)) == \
            [("waiting",)]
    else:
        await daemon.kill()

    await daemon.start()
    await waiting_in(daemon, run_id, "verify")
    await daemon.post("/v1/events", {"topic": HEALTH, "data": {"healthy": True}})
    story = await daemon.wait_run(run_id, lambda s: s["status"] == "succeeded",
                                  what="the resumed run to be fixed")
    assert story["outcome"] == "fixed"
    assert [(s["task"], s["status"]) for s in story["steps"]] == [
        ("restart", "succeeded"), ("verify", "succeeded"), ("fixed", "succeeded")]
    assert parse_time(task_of(story, "verify")["finished"]) < deadline
    ((progress,),) = daemon.store_query("SELECT progress FROM runs WHERE id=?", (run_id,))
    assert orjson.loads(progress)["tasks"]["verify"].get("deadline", deadline) == deadline
    assert ssh_server.host.count(RESTART) == 1
    await daemon.stop()


@pytest.mark.parametrize("bus", ["kafka", "mqtt"])
async def test_finished_run_publishes_its_outcome_event_on_the_bus(
        bus: str, request: pytest.FixtureRequest, config: Config,
        loopd_factory: Factory) -> None:
    """A finished run publishes its outcome event (run, rule, key, status, outcome) to the
    topic of ``outcomes:`` on the configured Kafka or MQTT bus."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"a.yaml": [{"name": "noop-on-ping", "on": {"source": "webhook",
                                                                "topic": "ping"},
                                "key": "{{ event.host }}",
                                "run": {"action": "core.noop", "input": {"pong": True}}}]}
    topic = f"loopd.outcomes.{bus}"
    if bus == "kafka":
        broker: KafkaBroker = request.getfixturevalue("kafka_broker")
        topic = request.getfixturevalue("kafka_topic")
        await create_topic(broker.bootstrap, topic)
        config.sinks = [{"name": "bus", "type": "kafka", "bootstrap": broker.bootstrap}]
    else:
        mqtt: MqttBroker = request.getfixturevalue("mqtt_broker")
        config.sinks = [{"name": "bus", "type": "mqtt", "host": mqtt.host, "port": mqtt.port,
                         "username": mqtt.username}]
    config.extra["outcomes"] = {"bus": "bus", "topic": topic}
    daemon = loopd_factory(config)
    await daemon.start()

    if bus == "kafka":
        await daemon.post("/v1/events", {"topic": "ping", "data": {"host": "web-7"}})
        (record,) = await read_topic(broker.bootstrap, topic, 1)
        key, payload = record.key, record.value
    else:
        async with mqtt_client(mqtt) as client:
            await client.subscribe(topic, qos=1)
            await daemon.post("/v1/events", {"topic": "ping", "data": {"host": "web-7"}})
            message: aiomqtt.Message = await anext(aiter(client.messages))
        key, payload = b"web-7", message.payload
    outcome = orjson.loads(payload)
    (run,) = await daemon.runs()
    assert key == b"web-7"
    assert outcome["run"] == run["id"] and outcome["rule"] == "noop-on-ping"
    assert outcome["key"] == "web-7" and outcome["action"] == "core.noop"
    assert (outcome["status"], outcome["outcome"]) == ("succeeded", "done")
    assert outcome["finished"] >= outcome["created"]
    await daemon.stop()
