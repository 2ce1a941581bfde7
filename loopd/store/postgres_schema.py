"""The PostgreSQL schema of loopd's store: its versions, the migrations between them, and
the statements the store's hot paths use.

The tables and their meaning are the SQLite store's (``sqlite_schema``), plus what
several replicas share: ``admissions`` (the runs each ``Limit`` scope admitted),
``breakers``, ``commands``, and a position per event (``events.pos``). JSON values are
``jsonb``: readable with psql, and PostgreSQL itself refuses what it cannot hold (a
``\\u0000`` escape), which the store reports as a rejected record.

Batched statements take one array per column and ``unnest`` them: a batch of a thousand
rows is one statement and one round trip, and no statement is prepared (PgBouncer in
transaction mode).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# pg_advisory_xact_lock(MIGRATION_LOCK, n): the two-integer key space, apart from the
# one-bigint keys of Limit scopes (the two spaces never overlap)
LOCK_SPACE = 0x6C6F6F70  # "loop"
MIGRATION_LOCK = 1
EVENTS_LOCK = 2     # event positions are handed out in commit order (see EVENTS_INSERT)
COMMANDS_LOCK = 3   # the same for command numbers
REPLICA_LOCK = 4    # registering a replica name

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE events (pos bigserial NOT NULL UNIQUE, source text NOT NULL,
               id text NOT NULL, topic text NOT NULL, key text, time float8 NOT NULL,
               data jsonb NOT NULL, PRIMARY KEY (source, id))""",
        """CREATE TABLE decisions (seq bigserial PRIMARY KEY, source text NOT NULL,
               event_id text NOT NULL, rule text NOT NULL, key text, outcome text NOT NULL,
               reason text, time float8 NOT NULL, incident_id text, run_id text,
               UNIQUE (source, event_id, rule))""",
        "CREATE INDEX decisions_incident ON decisions (incident_id)",
        "CREATE INDEX decisions_run ON decisions (run_id)",
        "CREATE INDEX decisions_rule ON decisions (rule)",
        """CREATE TABLE incidents (id text PRIMARY KEY, rule text NOT NULL, key text NOT NULL,
               status text NOT NULL, opened float8 NOT NULL, closed float8,
               events integer NOT NULL, run_id text, outcome text)""",
        "CREATE UNIQUE INDEX incidents_one_open ON incidents (rule, key) WHERE status='open'",
        "CREATE INDEX incidents_opened ON incidents (opened)",
        """CREATE TABLE runs (id text PRIMARY KEY, incident_id text, rule text, key text,
               kind text NOT NULL, target text NOT NULL, input jsonb, status text NOT NULL,
               created float8 NOT NULL, started float8, finished float8, reason text,
               ctx jsonb, outcome text, event jsonb, progress jsonb, owner text,
               epoch bigint NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 0)""",
        "CREATE INDEX runs_status ON runs (status)",
        "CREATE INDEX runs_created ON runs (created)",
        "CREATE INDEX runs_rule_key ON runs (rule, key, created)",
        """CREATE TABLE steps (run_id text NOT NULL, seq integer NOT NULL, task text NOT NULL,
               action text, attempt integer NOT NULL, status text NOT NULL,
               started float8 NOT NULL, finished float8, input jsonb, output jsonb,
               error text, transition text, PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE timers (rule text NOT NULL, key text NOT NULL, since float8 NOT NULL,
               PRIMARY KEY (rule, key))""",
        """CREATE TABLE kv (namespace text NOT NULL, key text NOT NULL, value jsonb NOT NULL,
               updated float8 NOT NULL, PRIMARY KEY (namespace, key))""",
        # heartbeat: the database's clock (see PostgresStore), so hosts need not agree
        """CREATE TABLE replicas (name text PRIMARY KEY, incarnation text NOT NULL,
               host text NOT NULL, pid integer NOT NULL, heartbeat float8 NOT NULL)""",
        """CREATE TABLE audit (seq bigserial PRIMARY KEY, time float8 NOT NULL,
               request text NOT NULL, who text NOT NULL, role text NOT NULL,
               action text NOT NULL, target text, params jsonb, status integer,
               outcome text NOT NULL, client text)""",
        "CREATE INDEX audit_time ON audit (time)",
        "CREATE INDEX audit_target ON audit (target, seq)",
        """CREATE FUNCTION loopd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
               FOR EACH ROW EXECUTE FUNCTION loopd_audit_append_only()""",
        """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
               FOR EACH STATEMENT EXECUTE FUNCTION loopd_audit_append_only()""",
        # one row per (Limit scope, admitted run): what every replica admitted
        """CREATE TABLE admissions (scope text NOT NULL, run_id text NOT NULL, key text,
               time float8 NOT NULL, incident_id text, PRIMARY KEY (scope, run_id))""",
        "CREATE INDEX admissions_time ON admissions (scope, time)",
        "CREATE INDEX admissions_incident ON admissions (incident_id)",
        """CREATE TABLE breakers (scope text PRIMARY KEY, opened float8 NOT NULL,
               until float8 NOT NULL, reason text NOT NULL)""",
        """CREATE TABLE commands (seq bigserial PRIMARY KEY, run_id text NOT NULL,
               kind text NOT NULL, by text, reason text, time float8 NOT NULL)""",
        "CREATE INDEX commands_run ON commands (run_id, seq)",
    ],
}

CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"

# ``unnest`` of one typed array per column: a batch is one statement
# under the EVENTS_LOCK, taken in the same statement before any row (and so any position)
# is produced, held until commit: positions are handed out in commit order
EVENTS_INSERT = (
    "INSERT INTO events (source, id, topic, key, time, data) "
    "SELECT s, i, t, k, tm, d::jsonb FROM (SELECT pg_advisory_xact_lock(%s, %s)) AS l, "
    "unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], %b::text[]) "
    "AS e(s, i, t, k, tm, d) ON CONFLICT (source, id) DO NOTHING")
DECISIONS_INSERT = (
    "INSERT INTO decisions (source, event_id, rule, key, outcome, reason, time, "
    "incident_id, run_id) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], "
    "%b::text[], %b::text[], %b::text[], %b::float8[], %b::text[], %b::text[]) "
    "ON CONFLICT (source, event_id, rule) DO NOTHING RETURNING source, event_id, rule")
# a closed incident is never opened again (a replica's memory may be behind the store)
INCIDENTS_UPDATE = (
    "UPDATE incidents SET status=CASE WHEN incidents.status='closed' THEN 'closed' "
    "ELSE u.status END, closed=COALESCE(incidents.closed, u.closed), events=u.events, "
    "run_id=CASE WHEN incidents.status='closed' THEN incidents.run_id ELSE u.run_id END, "
    "outcome=COALESCE(incidents.outcome, u.outcome) FROM unnest(%b::text[], %b::text[], "
    "%b::float8[], %b::int[], %b::text[], %b::text[]) "
    "AS u(id, status, closed, events, run_id, outcome) "
    "WHERE incidents.id = u.id RETURNING incidents.id")
# DO NOTHING without a target: a row meeting the open incident of its (rule, key)
# (the partial unique index) is not inserted, and the store finds which one it met
INCIDENTS_INSERT = (
    "INSERT INTO incidents (id, rule, key, status, opened, closed, events, run_id, outcome) "
    "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], "
    "%b::float8[], %b::int[], %b::text[], %b::text[]) ON CONFLICT DO NOTHING RETURNING id")
INCIDENT_COLUMNS = "id, rule, key, status, opened, closed, events, run_id, outcome"

RUN_COLUMNS = ("id", "incident_id", "rule", "key", "kind", "target", "input", "status",
               "created", "started", "finished", "reason", "ctx", "outcome", "event",
               "progress", "owner", "epoch", "version")
RUN_TYPES = ("text", "text", "text", "text", "text", "text", "text", "text", "float8",
             "float8", "float8", "text", "text", "text", "text", "text", "text", "int8", "int8")
_JSON_RUN = frozenset({"input", "ctx", "event", "progress"})


def _unnest(columns: tuple[str, ...], types: tuple[str, ...], alias: str) -> str:
    arrays = ", ".join(f"%b::{t}[]" for t in types)
    return f"unnest({arrays}) AS {alias}({', '.join(columns)})"


def _value(column: str, alias: str) -> str:
    return f"{alias}.{column}::jsonb" if column in _JSON_RUN else f"{alias}.{column}"


SELECT_RUN = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
RUNS_INSERT = (
    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) "
    f"SELECT {', '.join(_value(c, 'r') for c in RUN_COLUMNS)} "
    f"FROM {_unnest(RUN_COLUMNS, RUN_TYPES, 'r')} ON CONFLICT (id) DO NOTHING "
    "RETURNING id, epoch")
# run_updates of a batch (a queued run started, or cancelled, by the engine): this replica
# takes the run, as a claim would (the epoch goes up)
RUNS_UPSERT = (
    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) "
    f"SELECT {', '.join(_value(c, 'r') for c in RUN_COLUMNS)} "
    f"FROM {_unnest(RUN_COLUMNS, RUN_TYPES, 'r')} ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in RUN_COLUMNS if c not in ("id", "epoch"))
    + ", epoch=runs.epoch+1 RETURNING id, epoch")
# save_run of held runs, fenced: written only while owned by this replica (%s) under the
# epoch this store holds each under (the ``epoch`` array)
RUNS_SAVE = (
    "UPDATE runs SET " + ", ".join(f"{c}={_value(c, 'r')}" for c in RUN_COLUMNS
                                   if c not in ("id", "epoch")) +
    f" FROM {_unnest(RUN_COLUMNS, RUN_TYPES, 'r')} "
    "WHERE runs.id = r.id AND runs.owner = %s AND runs.epoch = r.epoch RETURNING runs.id")

STEP_COLUMNS = ("run_id", "seq", "task", "action", "attempt", "status", "started",
                "finished", "input", "output", "error", "transition", "held")
STEP_TYPES = ("text", "int4", "text", "text", "int4", "text", "float8", "float8", "text",
              "text", "text", "text", "int8")
# fenced like RUNS_SAVE: FOR SHARE waits for a concurrent claim of the run and sees its
# result, so a step is never written under an epoch another replica just took over
STEPS_SAVE = (
    "INSERT INTO steps (run_id, seq, task, action, attempt, status, started, finished, "
    "input, output, error, transition) SELECT s.run_id, s.seq, s.task, s.action, s.attempt, "
    "s.status, s.started, s.finished, s.input::jsonb, s.output::jsonb, s.error, s.transition "
    f"FROM {_unnest(STEP_COLUMNS, STEP_TYPES, 's')} JOIN runs ON runs.id = s.run_id "
    "AND runs.owner = %s AND runs.epoch = s.held FOR SHARE OF runs "
    "ON CONFLICT (run_id, seq) DO UPDATE SET task=excluded.task, action=excluded.action, "
    "attempt=excluded.attempt, status=excluded.status, started=excluded.started, "
    "finished=excluded.finished, input=excluded.input, output=excluded.output, "
    "error=excluded.error, transition=excluded.transition RETURNING run_id, seq")

# the earliest start wins: two replicas that both saw the condition start to hold (webhooks
# spread over them) keep the first one's instant
TIMERS_SET = (
    "INSERT INTO timers (rule, key, since) SELECT * FROM unnest(%b::text[], %b::text[], "
    "%b::float8[]) ON CONFLICT (rule, key) DO UPDATE SET "
    "since=LEAST(timers.since, excluded.since)")
TIMERS_CLEAR = (
    "DELETE FROM timers USING unnest(%b::text[], %b::text[]) AS c(rule, key) "
    "WHERE timers.rule = c.rule AND timers.key = c.key")
KV_DELETE = (
    "DELETE FROM kv USING unnest(%b::text[], %b::text[]) AS c(namespace, key) "
    "WHERE kv.namespace = c.namespace AND kv.key = c.key")
KV_PUT = (
    "INSERT INTO kv (namespace, key, value, updated) SELECT n, k, v::jsonb, %s FROM "
    "unnest(%b::text[], %b::text[], %b::text[]) AS p(n, k, v) "
    "ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value, "
    "updated=excluded.updated")
ADMISSIONS_INSERT = (
    "INSERT INTO admissions (scope, run_id, key, time, incident_id) SELECT * FROM "
    "unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::text[]) "
    "ON CONFLICT (scope, run_id) DO NOTHING")
# a breaker still open at the new one's opening is left as it is
BREAKERS_OPEN = (
    "INSERT INTO breakers (scope, opened, until, reason) SELECT * FROM unnest(%b::text[], "
    "%b::float8[], %b::float8[], %b::text[]) ON CONFLICT (scope) DO UPDATE SET "
    "opened=excluded.opened, until=excluded.until, reason=excluded.reason "
    "WHERE breakers.until <= excluded.opened RETURNING scope")

AUDIT_COLUMNS = ("time", "request", "who", "role", "action", "target", "params", "status",
                 "outcome", "client")
AUDIT_APPEND = (
    f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) SELECT t, rq, w, ro, a, tg, p::jsonb, "
    "st, o, c FROM unnest(%b::float8[], %b::text[], %b::text[], %b::text[], %b::text[], "
    "%b::text[], %b::text[], %b::int4[], %b::text[], %b::text[]) "
    "AS x(t, rq, w, ro, a, tg, p, st, o, c)")
SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)}, seq FROM audit"

# the database's clock as epoch seconds: heartbeats and lease expiry use it alone
DB_NOW = "extract(epoch from clock_timestamp())::float8"
