"""What is particular to the PostgreSQL store, on a real server started by the tests
(``tests/servers/postgres.py``): migrations raced by replicas starting together, a server
restart, records PostgreSQL refuses, LISTEN/NOTIFY, concurrent claims, group commit, and
the DSN's password kept out of every message. The Store contract itself runs on it in
``tests/unit/test_store_contract.py`` and ``tests/unit/test_store_cluster.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loopd.decide.committer import Committer
from loopd.errors import ConfigError, LeaseLost, StoreError, StoreRejected
from loopd.events import Event
from loopd.store.base import (
    Batch,
    CommandRecord,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    Limit,
    RunRecord,
    StepRecord,
)
from loopd.store.postgres import PostgresStore
from loopd.store.postgres_schema import SCHEMA_VERSION
from tests.servers import free_port, require, wait_port, wait_until
from tests.servers.postgres import USER, PostgresServer, _as_server_user

Open = Callable[..., Any]


@pytest.fixture
async def stores(postgres_dsn: str) -> AsyncIterator[Open]:
    """Opens PostgresStores on this test's database; closes them all at the end."""
    opened: list[PostgresStore] = []

    async def open_store(replica: str = "a", **options: Any) -> PostgresStore:
        options.setdefault("pool_min", 1)
        options.setdefault("pool_max", 4)
        store = PostgresStore(options.pop("dsn", postgres_dsn), replica=replica, **options)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


def _run(run_id: str, created: float | None = None) -> RunRecord:
    return RunRecord(run_id, None, "r", "web-1", "action", "core.noop", {"a": 1}, "pending",
                     created if created is not None else time.time())


def _database(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


async def test_replicas_opening_a_new_database_together_migrate_it_once(
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """Four replicas opening one empty database at the same moment all open it; the
    schema is created once (the advisory lock serializes them) and records its version."""
    stores = [PostgresStore(postgres_dsn, replica=f"r{i}", pool_min=1, pool_max=2)
              for i in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].commit(Batch(runs=[_run("run-1")]))
        assert await stores[3].get_run("run-1") is not None
    finally:
        for store in stores:
            await store.close()
    db = _database(postgres_dsn)
    assert postgres_server.psql("SELECT version FROM schema_version", db).split() == \
        [str(SCHEMA_VERSION)]


async def test_a_database_from_a_newer_loopd_is_refused(
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """A schema version above this loopd's is refused with a StoreError naming the server
    (not its password), and nothing is left open."""
    db = _database(postgres_dsn)
    postgres_server.psql("CREATE TABLE schema_version (version integer NOT NULL); "
                         f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION + 1})", db)
    store = PostgresStore(postgres_dsn, replica="a", pool_min=1)
    with pytest.raises(StoreError, match="newer than this loopd") as info:
        await store.open()
    assert info.value.origin is not None and db in info.value.origin
    with pytest.raises(StoreError, match="not open"):
        await store.get_run("x")


async def test_the_store_works_again_after_a_server_restart(
        postgres_server: PostgresServer, postgres_dsn: str, stores: Open) -> None:
    """While the server is down, reads and writes raise StoreError (bounded, never a hang);
    once it is back they work again on new connections, and LISTEN is made again."""
    a = await stores("a", timeout=3.0)
    b = await stores("b", timeout=3.0)
    await a.commit(Batch(runs=[_run("before")]))
    postgres_server.stop()
    try:
        with pytest.raises(StoreError):
            await a.commit(Batch(runs=[_run("during")]))
        with pytest.raises(StoreError):
            await a.get_run("before")
    finally:
        postgres_server.start()
    await a.commit(Batch(runs=[_run("after")]))
    assert {r.id for r in await b.list_runs()} == {"before", "after"}
    # the listener connects again (after its backoff) and a write of b's wakes a again
    db = _database(postgres_dsn)
    await wait_until(lambda: postgres_server.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'loopd a' "
        "AND query = 'LISTEN loopd'", db).strip() == "1", timeout=30,
        interval=0.1, what="a's LISTEN connection to be made again")
    await a.wait_changed(0)  # the wake-up the reconnection itself gives
    waiting = asyncio.create_task(a.wait_changed(120))
    await b.commit(Batch(runs=[_run("wake")]))
    await asyncio.wait_for(waiting, 30)


async def test_an_unreachable_server_is_a_store_error_naming_it_without_the_password(
        stores: Open) -> None:
    """Opening on a port nothing listens on fails with a StoreError that names the server
    and never shows the DSN's password."""
    dsn = "postgresql://loopd:s3cret-pw@127.0.0.1:1/loopd"
    with pytest.raises(StoreError) as info:
        await stores("a", dsn=dsn, timeout=2.0)
    text = str(info.value)
    assert "127.0.0.1:1/loopd" in text and "s3cret-pw" not in text


async def test_a_malformed_dsn_is_refused_without_showing_it(stores: Open) -> None:
    """A DSN that does not parse is refused without echoing it (psycopg's own message
    quotes the connection string)."""
    with pytest.raises(StoreError) as info:
        await stores("a", dsn="host=db password=s3cret-pw nonsense", timeout=2.0)
    assert "s3cret-pw" not in str(info.value) and "not shown" in str(info.value)


async def test_a_wrong_password_never_shows_up_in_errors_or_logs(
        postgres_server: PostgresServer, postgres_dsn: str, stores: Open,
        caplog: pytest.LogCaptureFixture) -> None:
    """A role that needs a password, given the wrong one: the error says why and names the
    server, and neither it nor any log line carries the password."""
    db = _database(postgres_dsn)
    postgres_server.psql("CREATE ROLE pw_user LOGIN PASSWORD 'right-pw'", db)
    hba = postgres_server.data / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + original)
    postgres_server.psql("SELECT pg_reload_conf()")
    try:
        port = postgres_server.port
        with caplog.at_level(logging.DEBUG), pytest.raises(StoreError) as info:
            await stores("a", dsn=f"postgresql://pw_user:wr0ng-pw@127.0.0.1:{port}/{db}",
                         timeout=2.0)
        assert "password authentication failed" in str(info.value)
        assert "wr0ng-pw" not in str(info.value)
        assert all("wr0ng-pw" not in r.getMessage() for r in caplog.records)
    finally:
        hba.write_text(original)
        postgres_server.psql("SELECT pg_reload_conf()")


async def test_records_postgresql_cannot_hold_are_rejected_not_retried(stores: Open) -> None:
    """A NUL character in text or a \\u0000 in JSON is a StoreRejected (never written,
    never worth a retry), and the failed batch leaves nothing behind."""
    store = await stores()
    now = time.time()
    bad_json = Batch(events=[EventRecord("w", "e1", "t", "k", now, {"v": "a\u0000b"})],
                     decisions=[DecisionRecord("w", "e1", "r", "k", "suppressed", None, now)])
    with pytest.raises(StoreRejected):
        await store.commit(bad_json)
    with pytest.raises(StoreRejected):
        await store.commit(Batch(decisions=[DecisionRecord("w", "e\x00", "r", "k",
                                                           "suppressed", None, now)]))
    assert await store.count_decisions() == 0 and await store.last_event() == 0
    with pytest.raises(StoreRejected):  # NOT NULL
        await store.commit(Batch(decisions=[DecisionRecord("w", "e2", "r", "k",
                                                           None, None, now)]))  # type: ignore[arg-type]


async def test_a_rejected_event_is_found_by_bisection_and_the_rest_committed(
        stores: Open) -> None:
    """The committer halves a batch Postgres refuses until the one event with a NUL is
    found: it gets an ``error`` decision, every other event is decided as usual."""
    store = await stores()
    batch, marks, events = Batch(), [], []
    now = time.time()
    for i in range(8):
        marks.append(batch.mark())
        ident = f"e{i}"
        data: dict[str, Any] = {"v": "bad\u0000" if i == 5 else i}
        events.append(Event(id=ident, source="w", topic="t", data=data, key=f"k{i}", time=now))
        inc = IncidentRecord(f"inc-{i}", "r", f"k{i}", "open", now, run_id=f"run-{i}")
        batch.events.append(EventRecord("w", ident, "t", f"k{i}", now, data))
        batch.decisions.append(DecisionRecord("w", ident, "r", f"k{i}", "run_created", None,
                                              now, inc.id, f"run-{i}"))
        batch.incidents[inc.id] = inc
        batch.runs.append(RunRecord(f"run-{i}", inc.id, "r", f"k{i}", "action", "core.noop",
                                    data, "pending", now))
    marks.append(batch.mark())
    result = await Committer(store).commit(batch, marks, list[Event | None](events))
    assert result.skipped_runs == {"run-5"}
    outcomes = {d.event_id: d.outcome for i in range(8)
                for d in await store.decisions_for(incident_id=f"inc-{i}")}
    assert outcomes == {f"e{i}": "run_created" for i in range(8) if i != 5}
    assert await store.count_decisions() == 8  # e5's error decision
    assert {r.id for r in await store.list_runs()} == {f"run-{i}" for i in range(8) if i != 5}


async def test_one_rejected_writer_fails_alone_in_its_group(stores: Open) -> None:
    """Writers committed together: the one whose record is refused gets StoreRejected,
    the others' writes are durable."""
    store = await stores()
    now = time.time()
    writes = [store.commit(Batch(decisions=[DecisionRecord(
        "w", f"e{i}" if i != 3 else "e\x00", "r", "k", "suppressed", None, now)]))
        for i in range(10)]
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(r).__name__ for r in results].count("StoreRejected") == 1
    assert isinstance(results[3], StoreRejected)
    assert await store.count_decisions() == 9


async def test_a_write_of_another_replica_wakes_wait_changed(stores: Open) -> None:
    """wait_changed returns when another replica commits runs, events or a command (the
    NOTIFY of its transaction), long before its timeout."""
    a = await stores("a")
    b = await stores("b")
    for write in (b.commit(Batch(runs=[_run("run-1")])),
                  b.commit(Batch(events=[EventRecord("w", "e1", "t", "k", 1.0, {})])),
                  b.save_run(_run("run-2"))):
        waiting = asyncio.create_task(a.wait_changed(120))
        await asyncio.sleep(0)  # a is waiting before b writes
        await write
        await asyncio.wait_for(waiting, 30)


async def test_two_replicas_claiming_at_once_never_claim_a_run_twice(
        postgres_server: PostgresServer, postgres_dsn: str, stores: Open) -> None:
    """The runs of a dead replica, claimed by two replicas many times concurrently (FOR
    UPDATE SKIP LOCKED): each run goes to exactly one of them, under epoch 1."""
    dead = await stores("dead")
    await dead.commit(Batch(runs=[_run(f"run-{i}") for i in range(300)]))
    postgres_server.psql("UPDATE replicas SET heartbeat = heartbeat - 3600 "
                         "WHERE name = 'dead'", _database(postgres_dsn))
    a = await stores("a", pool_max=6)
    b = await stores("b", pool_max=6)
    # others_only: a replica claiming again does not take back its own (epoch 2)
    claims = await asyncio.gather(*(s.claim_runs(("pending",), others_only=True)
                                    for _ in range(6) for s in (a, b)))
    won_by_a = {r for claim in claims[0::2] for r in claim}
    won_by_b = {r for claim in claims[1::2] for r in claim}
    assert not won_by_a & won_by_b
    assert won_by_a | won_by_b == {f"run-{i}" for i in range(300)}
    for claim in claims:
        assert set(claim.values()) <= {1}
    owners = {r.id: r.owner for r in await a.list_runs(limit=1000)}
    assert {rid for rid, owner in owners.items() if owner == "a"} == won_by_a


async def test_a_thousand_concurrent_step_writers_share_a_few_commits(stores: Open) -> None:
    """1,000 runs saving a step at the same time are written in a handful of transactions
    (group commit), and every step is durable when its writer returns."""
    store = await stores()
    runs = [_run(f"run-{i}") for i in range(1000)]
    await store.commit(Batch(runs=runs))
    before = store.commits
    now = time.time()
    await asyncio.gather(*(store.save_step(StepRecord(r.id, 1, "t", "core.noop", 1,
                                                      "succeeded", now)) for r in runs))
    assert store.commits - before <= 20
    assert all([len(await store.steps(r.id)) == 1 for r in runs[::97]])


async def test_the_dsn_reference_is_resolved_at_open(
        postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``store: {type: postgres, dsn: env:NAME}`` builds a PostgresStore whose DSN is read
    from the environment when it opens."""
    from loopd.config import LoopdConfig
    from loopd.wiring import build_store

    monkeypatch.setenv("LOOPD_TEST_PG_DSN", postgres_dsn)
    config = LoopdConfig.model_validate({"store": {
        "type": "postgres", "dsn": "env:LOOPD_TEST_PG_DSN", "pool": {"min": 1, "max": 3}}})
    store = build_store(config)
    assert isinstance(store, PostgresStore) and store.pool_max == 3
    await store.open()
    try:
        await store.commit(Batch(runs=[_run("run-1")]))
        assert await store.get_run("run-1") is not None
    finally:
        await store.close()


@pytest.mark.parametrize("store", [
    {"type": "postgres", "dsn": "postgresql://loopd:s3cret-pw@db/loopd"},
    {"type": "postgres", "dsn": "host=db password=s3cret-pw"},
    {"type": "postgres", "dsn": "vault:s3cret-pw"},
])
def test_a_literal_password_in_the_config_is_refused_without_showing_it(
        store: dict[str, Any], tmp_path: Path) -> None:
    """A DSN in loopd.yaml that holds a password (instead of a reference) is refused, and
    the message names the field and file:line without the password."""
    from loopd.config import load_config

    path = tmp_path / "loopd.yaml"
    path.write_text("listen: 127.0.0.1:8080\nstore:\n"
                    + "".join(f"  {k}: {v!r}\n" for k, v in store.items()))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "s3cret-pw" not in text and "store.dsn" in text and f"{path}:4" in text


@pytest.fixture
def bouncer_dsn(postgres_server: PostgresServer, postgres_dsn: str) -> Iterator[str]:
    """A DSN of this test's database through PgBouncer in transaction mode (Debian's
    ``pgbouncer``; ``./scripts/test`` installs it), with fewer server connections than
    the stores' pools: every transaction may land on another server connection."""
    binary = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer",) if os.path.exists(p)), None)
    require(binary is not None, "pgbouncer (Debian's pgbouncer package)")
    assert binary is not None
    root = Path(tempfile.mkdtemp(prefix="loopd-pgbouncer-"))
    port = free_port()
    (root / "users.txt").write_text(f'"{USER}" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"[databases]\n* = host=127.0.0.1 port={postgres_server.port}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {root}/users.txt\npool_mode = transaction\n"
        f"default_pool_size = 3\nmax_client_conn = 100\nlogfile = {root}/pgbouncer.log\n")
    if os.geteuid() == 0:  # like postgres, pgbouncer refuses to run as root
        for path in (root, *root.iterdir()):
            shutil.chown(path, "nobody", "nogroup")
    proc = subprocess.Popen([*_as_server_user(), binary, str(root / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"postgresql://{USER}@127.0.0.1:{port}/{_database(postgres_dsn)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            shutil.rmtree(root, ignore_errors=True)


async def test_replicas_behind_pgbouncer_in_transaction_mode(
        bouncer_dsn: str, postgres_dsn: str, stores: Open) -> None:
    """Through PgBouncer in transaction mode (LISTEN straight to the server): two replicas
    deciding at once keep a fleet budget, a run taken over refuses its former owner's
    save, a command reaches the owner and a write wakes the other replica."""
    a = await stores("a", dsn=bouncer_dsn, listen_dsn=postgres_dsn, pool_max=6)
    b = await stores("b", dsn=bouncer_dsn, listen_dsn=postgres_dsn, pool_max=6)
    now = time.time()
    fleet = Limit("fleet", "window", 20, 3600.0, "budget", "fleet budget of 20 runs")

    def decided(i: int) -> Batch:
        inc = IncidentRecord(f"inc-{i}", "r", f"k{i}", "open", now, run_id=f"run-{i}")
        run = RunRecord(f"run-{i}", inc.id, "r", f"k{i}", "action", "core.noop", {}, "pending",
                        now)
        return Batch(events=[EventRecord("w", f"e{i}", "t", f"k{i}", now, {"i": i})],
                     decisions=[DecisionRecord("w", f"e{i}", "r", f"k{i}", "run_created", None,
                                               now, inc.id, run.id)],
                     incidents={inc.id: inc}, runs=[run], limits={run.id: [fleet]})

    results = await asyncio.gather(*(([a, b][i % 2]).commit(decided(i)) for i in range(100)))
    assert sum(len(r.refused) for r in results) == 80
    runs = await a.list_runs(limit=1000)
    assert len(runs) == 20 and await b.last_event() > 0
    mine = next(r for r in runs if r.owner == "a")
    await b.send_command(CommandRecord(mine.id, "cancel", "oncall", None, now))
    assert [c.kind for c in await a.commands(0)] == ["cancel"]
    waiting = asyncio.create_task(a.wait_changed(120))
    await asyncio.sleep(0)
    assert mine.id in await b.claim_runs(("pending",), lease=0.0, others_only=True)
    await b.save_run(mine)  # b holds it now: its write is the one that counts
    await asyncio.wait_for(waiting, 30)
    with pytest.raises(LeaseLost):
        await a.save_run(mine)


@pytest.mark.parametrize(("store", "message"), [
    ({"type": "postgres"}, "needs dsn"),
    ({"type": "postgres", "dsn": "env:PG", "path": "x.db"}, "sqlite store only"),
    ({"dsn": "env:PG"}, "postgres store only"),
    ({"type": "postgres", "dsn": "env:"}, "malformed env: reference"),
    ({"type": "postgres", "dsn": "env:PG", "pool": {"min": 3, "max": 2}}, "below pool.min"),
])
def test_store_settings_that_do_not_fit_its_type_are_refused(
        store: dict[str, Any], message: str, tmp_path: Path) -> None:
    """Each store type takes its own settings: a postgres store needs a DSN reference and
    has no path, a sqlite store has no DSN, a pool's max is not below its min."""
    from loopd.config import load_config

    path = tmp_path / "loopd.yaml"
    path.write_text("store:\n" + "".join(f"  {k}: {v!r}\n" for k, v in store.items()))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_password_less_dsn_is_allowed_and_store_path_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A literal DSN without a password is accepted (libpq's PGPASSWORD or .pgpass gives
    it), and LOOPD_STORE_PATH does not turn a postgres store into a file path."""
    from loopd.config import load_config

    monkeypatch.setenv("LOOPD_STORE_PATH", "/srv/loopd/state.db")
    path = tmp_path / "loopd.yaml"
    path.write_text("store: {type: postgres, dsn: 'postgresql://loopd@db/loopd'}\n")
    config = load_config(path)
    assert config.store.type == "postgres" and config.store.dsn == "postgresql://loopd@db/loopd"


async def test_a_commit_chosen_as_a_deadlock_victim_is_retried(
        postgres_dsn: str, stores: Open) -> None:
    """A group commit that PostgreSQL rolls back to break a deadlock is written again:
    the writer sees its commit succeed, and the other transaction goes through too.

    PostgreSQL checks a waiting transaction for a deadlock once, deadlock_timeout after it
    began to wait, and rolls back the one whose check finds the cycle. The store's
    sessions wait 3 s before their check and the test's 60 s, so the store's check comes
    after the cycle closed however slow the machine (with 1 s each, a busy machine let the
    store's check pass before the test's second update, and the test's own was the one
    rolled back)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT current_database()")
        row = await cur.fetchone()
        assert row is not None
        await admin.execute(f'ALTER DATABASE "{row[0]}" SET deadlock_timeout = \'3s\'')
    store = await stores()
    first, second = _run("r1"), _run("r2")
    await store.commit(Batch(runs=[first, second]))
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as other:
        await other.execute("SET deadlock_timeout = '60s'")
        await other.execute("UPDATE runs SET reason='other' WHERE id='r1'")  # holds r1
        # the store's statement locks r2, then waits for r1
        writing = asyncio.create_task(store.commit(Batch(run_updates=[second, first])))

        async def store_waits() -> bool:
            cur = await other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid() AND datname = current_database()")
            row = await cur.fetchone()
            return row is not None and row[0] > 0

        await wait_until(store_waits, what="the store's commit to wait for r1")
        # r2 closes the cycle: the store, waiting longer, is the one rolled back
        await other.execute("UPDATE runs SET reason='other' WHERE id='r2'")
        await other.commit()
    await asyncio.wait_for(writing, 60)
    saved = await store.get_run("r2")
    assert saved is not None and saved.reason is None and saved.owner == "a"


async def test_three_replicas_deciding_at_once_never_exceed_a_budget_or_a_radius(
        stores: Open) -> None:
    """Three replicas committing 150 new runs at the same moment (each its own group
    commits, in parallel transactions): the fleet window budget and the blast radius are
    counted in the transactions under their scopes' locks, so neither is ever exceeded."""
    replicas = [await stores(name, pool_max=6) for name in ("a", "b", "c")]
    now = time.time()
    fleet = Limit("fleet", "window", 25, 3600.0, "budget", "fleet budget of 25 runs")
    radius = Limit("group:web", "open", 10, 0.0, "blast_radius", "10 of group web at most")

    def decided(i: int) -> Batch:
        key = f"web-{i % 40}"
        inc = IncidentRecord(f"inc-{i}", "r", key, "open", now, run_id=f"run-{i}")
        run = RunRecord(f"run-{i}", inc.id, "r", key, "action", "core.noop", {}, "pending", now)
        limits = [fleet, radius] if i % 3 else [radius]
        return Batch(decisions=[DecisionRecord("w", f"e{i}", "r", key, "run_created", None,
                                               now, inc.id, run.id)],
                     incidents={inc.id: inc}, runs=[run], limits={run.id: limits})

    await asyncio.gather(*(replicas[i % 3].commit(decided(i)) for i in range(150)))
    runs = await replicas[0].list_runs(limit=1000)
    open_keys = {i.key for i in await replicas[0].list_incidents(status="open", limit=1000)}
    assert len(open_keys) == 10 and len({r.key for r in runs}) == 10
    fleet_runs = [r for r in runs if int(r.id.split("-")[1]) % 3]
    assert len(fleet_runs) <= 25


async def test_a_reader_following_events_since_never_misses_one(stores: Open) -> None:
    """Two replicas storing events at once while a third follows ``events_since`` from the
    last position it saw: it reads every event exactly once (positions are handed out in
    commit order, so none commits behind a position already read)."""
    a, b, reader = await stores("a"), await stores("b"), await stores("reader")
    done = asyncio.Event()

    async def write(store: PostgresStore, tag: str) -> None:
        for n in range(60):
            await asyncio.gather(*(store.commit(Batch(events=[
                EventRecord("w", f"{tag}-{n}-{i}-{j}", "t", "k", 1.0, {}) for j in range(3)]))
                for i in range(4)))

    async def writers() -> None:
        await asyncio.gather(write(a, "a"), write(b, "b"))
        done.set()

    seen: list[str] = []
    position = 0
    task = asyncio.create_task(writers())
    while True:
        finished = done.is_set()
        found = await reader.events_since(position)
        seen += [event.id for _, event in found]
        position = found[-1][0] if found else position
        if finished:
            break
        await asyncio.sleep(0)
    await task
    assert len(seen) == len(set(seen)) == 2 * 60 * 4 * 3


FROZEN_WRITER = """
import asyncio, sys, time, uuid
from loopd.store.postgres import PostgresStore
from loopd.store.base import Batch, DecisionRecord, EventRecord, Limit, RunRecord

async def main(dsn):
    store = PostgresStore(dsn, replica="frozen", lease=1.0, pool_min=1, pool_max=2)
    await store.open()
    print("ready", flush=True)
    for i in range(10**9):
        rid, now = uuid.uuid4().hex, time.time()
        await store.commit(Batch(
            events=[EventRecord("w", f"a{i}", "t", f"k{i}", now, {})],
            decisions=[DecisionRecord("w", f"a{i}", "r", f"k{i}", "run_created", None, now,
                                      None, rid)],
            runs=[RunRecord(rid, None, "r", f"k{i}", "action", "core.noop", {}, "pending",
                            now)],
            limits={rid: [Limit("fleet", "window", 10**9, 3600.0)]}))

asyncio.run(main(sys.argv[1]))
"""


async def _frozen_in_transaction(server: PostgresServer, database: str) -> bool:
    out = server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name="
                      "'loopd frozen' AND state LIKE 'idle in transaction%'", database)
    return int(out.strip() or 0) > 0


async def test_a_replica_frozen_inside_its_transaction_does_not_stall_the_others(
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """A replica SIGSTOPped in the middle of a group commit holds the locks of its
    transaction (the fleet scope, the event numbering): the server ends the transaction
    once it is idle for a third of the lease, so the other replicas commit and beat
    their hearts meanwhile (found in review: they timed out while it stayed frozen)."""
    database = postgres_dsn.rsplit("/", 1)[1]
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FROZEN_WRITER, postgres_dsn, stdout=asyncio.subprocess.PIPE)
    other = PostgresStore(postgres_dsn, replica="other", lease=1.0, timeout=3.0,
                          pool_min=1, pool_max=2)
    try:
        assert writer.stdout is not None
        assert (await writer.stdout.readline()).strip() == b"ready"
        for _ in range(200):  # stop it until it is stopped inside a transaction
            os.kill(writer.pid, signal.SIGSTOP)
            await asyncio.sleep(0.02)
            if await _frozen_in_transaction(postgres_server, database):
                break
            os.kill(writer.pid, signal.SIGCONT)
            await asyncio.sleep(0.005)
        else:
            pytest.fail("the writer was never stopped inside a transaction")
        await other.open()
        now, rid = time.time(), uuid.uuid4().hex
        batch = Batch(events=[EventRecord("w", "b1", "t", "x", now, {})],
                      decisions=[DecisionRecord("w", "b1", "r", "x", "run_created", None, now,
                                                None, rid)],
                      runs=[RunRecord(rid, None, "r", "x", "action", "core.noop", {},
                                      "pending", now)],
                      limits={rid: [Limit("fleet", "window", 10**9, 3600.0)]})
        results = await asyncio.gather(other.commit(batch), other.heartbeat(),
                                       return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert await other.get_run(rid) is not None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer.pid, signal.SIGCONT)
        writer.kill()
        await writer.wait()
        await other.close()


async def test_a_batch_committed_again_after_a_lost_answer_keeps_its_runs(
        stores: Open) -> None:
    """The connection drops while COMMIT is on its way: the committer cannot know it went
    through, and commits the same batch again. Its decisions are found stored with its
    own run ids: not duplicates, so its runs are started, and its limits are not counted
    twice (found in review: the runs were dropped from memory and never started)."""
    store = await stores()
    now = time.time()
    run = _run("run-1", now)
    run.incident_id = "inc-1"
    incident = IncidentRecord("inc-1", "r", "web-1", "open", now, run_id="run-1")
    budget = [Limit("fleet", "window", 1, 3600.0, "budget", "fleet budget of 1 run")]

    def batch() -> Batch:
        return Batch(
            events=[EventRecord("am", "e1", "t", "web-1", now, {})],
            decisions=[DecisionRecord("am", "e1", "r", "web-1", "run_created", None, now,
                                      "inc-1", "run-1")],
            incidents={"inc-1": incident}, runs=[run], limits={"run-1": budget})
    assert not await store.commit(batch())
    again = await store.commit(batch())
    assert not again.duplicates and not again.skipped_runs and not again.refused, again
    assert [r.id for r in await store.list_runs()] == ["run-1"]
    assert [(d.outcome, d.run_id) for d in await store.decisions_for(run_id="run-1")] == [
        ("run_created", "run-1")]
    # another event for another key: still refused by the budget the first run spent
    other = _run("run-2", now + 1)
    refused = await store.commit(Batch(runs=[other], limits={"run-2": budget}))
    assert set(refused.refused) == {"run-2"}
