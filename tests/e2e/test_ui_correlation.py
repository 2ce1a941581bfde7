"""Correlation in the web UI, in a real headless browser (Playwright with Debian's
chromium) against a real ``loopd run`` subprocess: a group incident appears live on the
incidents page as "frontend: N members" with its members and the matches it held back,
its inhibited matches are found through the decisions explorer's guard filter, and the
rules page shows what each rule correlates; ``loopd show`` of the group's run lists its
members; and two replicas on one PostgreSQL store, each sent some of the alerts, show
the same group.

Under ``CI=true`` a missing browser fails these tests (``servers.require``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, SharedStore, eventually
from tests.e2e.test_terminal import loopd
from tests.e2e.test_ui import UI_WAIT, browser
from tests.integration.test_guards_daemon import am_alert, notification

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, shared with test_ui

GROUP, HOST = "frontend-outage", "restart-hung-host"
RULES: list[dict[str, Any]] = [
    {"name": GROUP, "description": "Hosts of one group down together: one incident",
     "on": {"source": "alertmanager",
            "match": {"status": "firing", "labels.alertname": "HostDown"}},
     "key": "{{ event.labels.instance }}",
     "group": {"by": "{{ inventory[key].group }}", "count": 3, "within": "2m"},
     "inhibits": [HOST], "mode": "approval",  # the run waits: the incident stays open
     "run": {"action": "core.log", "input": {"message": "{{ key }} down"}}},
    {"name": HOST, "on": {"source": "alertmanager",
                          "match": {"status": "firing", "labels.alertname": "HostDown"}},
     "key": "{{ event.labels.instance }}", "run": {"action": "core.noop"}},
]
HOSTS = ["web-1", "web-2", "web-3", "web-4"]
COUNT = 3


def _config(config: Config, store: SharedStore | None = None) -> None:
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.rules = {"correlation.yaml": RULES}
    config.entities = {h: {"group": "frontend", "address": "127.0.0.1"} for h in HOSTS}
    if store is not None:
        config.extra["store"] = store.config()
    config.write()


async def _alert(daemon: LoopdProcess, host: str, at: float) -> None:
    body = await daemon.post("/v1/alertmanager", notification(am_alert(host, starts=at)))
    assert body["accepted"] == 1, body


async def _members(page: Page) -> list[str]:
    rows = page.locator("tr.group-detail tr.member")
    return [str(await rows.nth(i).get_attribute("data-member"))
            for i in range(await rows.count())]


async def test_a_group_incident_shows_live_with_its_members_and_what_it_held_back(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """The incidents page, open while the alerts arrive, shows the group incident once
    the third host alerts and then its fourth member, each member in order of arrival
    and each held-back host match; the explorer's guard filter finds those held back
    and the group's own waits; the rules page shows the group and its inhibitions."""
    _config(config)
    daemon = loopd_factory(config)
    await daemon.start()
    page = await browser.new_page()
    await page.goto(daemon.url + "/")
    await page.locator(".live.on").wait_for(timeout=UI_WAIT)

    t0 = time.time()
    for i, host in enumerate(HOSTS[:COUNT]):
        await _alert(daemon, host, t0 + i)
    title = page.locator("span.group")
    await title.filter(has_text=f"frontend: {COUNT} members").wait_for(timeout=UI_WAIT)
    assert await _members(page) == HOSTS[:COUNT]
    await _alert(daemon, HOSTS[COUNT], t0 + COUNT)  # a later member joins
    await title.filter(has_text=f"frontend: {len(HOSTS)} members").wait_for(timeout=UI_WAIT)
    assert await _members(page) == HOSTS
    # held back: the host that opened the group and the one after it
    held = page.locator("tr.inhibited-match")
    assert [await held.nth(i).get_attribute("data-member")
            for i in range(await held.count())] == HOSTS[COUNT - 1:]
    assert await held.first.locator("td.num").inner_text() == "1"

    # the held-back match's rule links to its decisions, filtered by guard and member
    await held.first.locator("a").click()
    await page.wait_for_url("**/decisions?**guard=inhibited**")
    row = page.locator("tr.decision.suppressed")
    await row.first.wait_for(timeout=UI_WAIT)
    assert await row.count() == 1
    assert await row.locator("td.guard").inner_text() == "inhibited"
    reason = await row.locator("td.reason").inner_text()
    assert f"{HOSTS[COUNT - 1]} is a member of group frontend of {GROUP}" in reason

    # the explorer's guard filter, chosen in the form: the group rule's waits
    await page.goto(daemon.url + "/decisions")
    await page.select_option("select[name=guard]", "group")
    await page.click("form.filters button")
    await page.wait_for_url("**guard=group**")
    waits = page.locator("tr.decision")
    await waits.first.wait_for(timeout=UI_WAIT)
    assert await waits.count() == COUNT - 1  # the members before the count
    assert {await waits.nth(i).locator("td.guard").inner_text()
            for i in range(COUNT - 1)} == {"group"}
    # each is the group's (its key), counting the members so far, newest first
    assert [await waits.nth(i).locator("td.key").inner_text()
            for i in range(COUNT - 1)] == ["frontend"] * (COUNT - 1)
    assert [await waits.nth(i).locator("td.reason").inner_text()
            for i in range(COUNT - 1)] == [
        f"guard group: {n} of {COUNT} members within 120s (group frontend, member "
        f"{HOSTS[n - 1]})" for n in reversed(range(1, COUNT))]

    await page.goto(daemon.url + "/rules")
    rule = await page.inner_text(f"#rule-{GROUP} td.correlation")
    assert "group by {{ inventory[key].group }}: 3 members within 2 min" in rule
    assert f"inhibits {HOST}" in rule
    assert (await page.inner_text(f"#rule-{HOST} td.correlation")).strip() == "-"


async def test_loopd_show_lists_the_members_of_the_runs_group_incident(
        config: Config, loopd_factory: Factory) -> None:
    """``loopd show`` of the group incident's run (the real CLI against the daemon) names
    the group and its member count, each member in order of arrival with its first
    event, and each host match held back."""
    _config(config)
    daemon = loopd_factory(config)
    await daemon.start()
    t0 = time.time()
    for i, host in enumerate(HOSTS):
        await _alert(daemon, host, t0 + i)
    (run,) = await daemon.wait_runs(1, status="awaiting_approval")
    story = await daemon.run(run["id"])
    assert [m["key"] for m in story["group"]["members"]] == HOSTS

    code, out, err = await loopd("show", run["id"], url=daemon.url)
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert f"group    frontend: {len(HOSTS)} members" in lines
    listed = [line.split()[1] for line in lines if "  first event alertmanager/" in line]
    assert listed == HOSTS
    for member in story["group"]["members"]:
        assert f"first event alertmanager/{member['event_id']}" in out
    held = [line.split()[:2] for line in lines if line.startswith(f"  {HOST}  ")]
    assert held == [[HOST, h] for h in HOSTS[COUNT - 1:]]


async def test_two_replicas_show_one_group_of_the_members_each_was_sent(
        tmp_path: Path, loopd_factory: Factory, postgres_dsn: str) -> None:
    """Two replicas on one PostgreSQL store, sent the alerts in turn (a, b, a, b), open one
    group incident, and both replicas' API and incidents page show the same four members
    in order of arrival and the same held-back host matches."""
    store = SharedStore(dsn=postgres_dsn)
    try:
        replicas = []
        for name in ("a", "b"):
            config = Config(root=tmp_path / name)
            _config(config, store)
            replicas.append(loopd_factory(config, env={"LOOPD_REPLICA": name, **store.env}))
        for daemon in replicas:
            await daemon.start()
        t0 = time.time()
        for i, host in enumerate(HOSTS):
            await _alert(replicas[i % 2], host, t0 + i)

        async def grouped() -> bool:
            views = [await _group(d) for d in replicas]
            return all(v is not None and v["member_count"] == len(HOSTS) for v in views)

        await eventually(grouped, what="both replicas to show the group's four members",
                         timeout=10)
        a, b = [await _group(d) for d in replicas]
        for daemon in replicas:
            assert f"frontend: {len(HOSTS)} members" in await daemon.get("/")
    finally:
        await store.close()
    assert a == b and a is not None
    assert [m["key"] for m in a["members"]] == HOSTS
    # which matches were held back depends on when the union of both replicas' members
    # reached the count; each is a host rule's match of a member, on the incident
    # (none, when the union reached the count only after the last alert was decided)
    assert {i["rule"] for i in a["inhibited"]} <= {HOST}
    assert {i["key"] for i in a["inhibited"]} <= set(HOSTS)


async def _group(daemon: LoopdProcess) -> dict[str, Any] | None:
    """The daemon's answer for its one open group incident (None before there is one)."""
    listed = await daemon.get("/v1/incidents?status=open")
    found = [i for i in listed["incidents"] if i["rule"] == GROUP]
    if not found:
        return None
    (incident,) = found
    detail: dict[str, Any] = await daemon.get(f"/v1/incidents/{incident['id']}")
    return {k: detail[k] for k in ("id", "key", "members", "member_count", "inhibited")}
