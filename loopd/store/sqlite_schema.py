"""The SQLite schema of loopd's store: its versions, the migrations between them, and the
statements the store's hot paths use."""

from __future__ import annotations

SCHEMA_VERSION = 4

# One entry per schema version: the statements that bring version N-1 to N.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE events (source TEXT NOT NULL, id TEXT NOT NULL, topic TEXT NOT NULL,
               key TEXT, time REAL NOT NULL, data BLOB NOT NULL, PRIMARY KEY (source, id))""",
        """CREATE TABLE decisions (seq INTEGER PRIMARY KEY, source TEXT NOT NULL,
               event_id TEXT NOT NULL, rule TEXT NOT NULL, key TEXT, outcome TEXT NOT NULL,
               reason TEXT, time REAL NOT NULL, incident_id TEXT, run_id TEXT,
               UNIQUE (source, event_id, rule))""",
        "CREATE INDEX decisions_incident ON decisions (incident_id)",
        "CREATE INDEX decisions_run ON decisions (run_id)",
        "CREATE INDEX decisions_rule ON decisions (rule)",
        """CREATE TABLE incidents (id TEXT PRIMARY KEY, rule TEXT NOT NULL, key TEXT NOT NULL,
               status TEXT NOT NULL, opened REAL NOT NULL, closed REAL, events INTEGER NOT NULL,
               run_id TEXT, outcome TEXT)""",
        "CREATE INDEX incidents_open ON incidents (status, rule, key)",
        """CREATE TABLE runs (id TEXT PRIMARY KEY, incident_id TEXT, rule TEXT, key TEXT,
               kind TEXT NOT NULL, target TEXT NOT NULL, input BLOB, status TEXT NOT NULL,
               created REAL NOT NULL, started REAL, finished REAL, reason TEXT, ctx BLOB,
               outcome TEXT, event BLOB, progress BLOB)""",
        "CREATE INDEX runs_status ON runs (status)",
        "CREATE INDEX runs_rule_key ON runs (rule, key, created)",
        """CREATE TABLE steps (run_id TEXT NOT NULL, seq INTEGER NOT NULL, task TEXT NOT NULL,
               action TEXT, attempt INTEGER NOT NULL, status TEXT NOT NULL, started REAL NOT NULL,
               finished REAL, input BLOB, output BLOB, error TEXT, transition TEXT,
               PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE timers (rule TEXT NOT NULL, key TEXT NOT NULL, since REAL NOT NULL,
               PRIMARY KEY (rule, key))""",
        """CREATE TABLE kv (namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
               updated REAL NOT NULL, PRIMARY KEY (namespace, key))""",
    ],
    2: [  # the store is the arbiter: one open incident per (rule, key); runs have owners
        """UPDATE incidents SET status='closed', closed=opened, outcome=COALESCE(outcome,
               'unknown') WHERE status='open' AND rowid NOT IN (SELECT MAX(rowid) FROM
               incidents WHERE status='open' GROUP BY rule, key)""",
        "CREATE UNIQUE INDEX incidents_one_open ON incidents (rule, key) WHERE status='open'",
        "ALTER TABLE runs ADD COLUMN owner TEXT",
        "ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE replicas (name TEXT PRIMARY KEY, incarnation TEXT NOT NULL,
               host TEXT NOT NULL, pid INTEGER NOT NULL, heartbeat REAL NOT NULL)""",
    ],
    3: [  # the audit trail: append-only, the database itself refuses UPDATE and DELETE
        """CREATE TABLE audit (seq INTEGER PRIMARY KEY, time REAL NOT NULL,
               request TEXT NOT NULL, who TEXT NOT NULL, role TEXT NOT NULL,
               action TEXT NOT NULL, target TEXT, params BLOB, status INTEGER,
               outcome TEXT NOT NULL, client TEXT)""",
        "CREATE INDEX audit_time ON audit (time)",
        "CREATE INDEX audit_target ON audit (target, seq)",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    ],
    4: [  # several replicas: guards counted across them, shared breakers, run commands
        """CREATE TABLE admissions (run_id TEXT NOT NULL, scope TEXT NOT NULL,
               key TEXT, at REAL NOT NULL, incident_id TEXT, open INTEGER NOT NULL)""",
        "CREATE INDEX admissions_scope ON admissions (scope, at)",
        "CREATE INDEX admissions_open ON admissions (scope, open)",
        "CREATE INDEX admissions_incident ON admissions (incident_id)",
        """CREATE TABLE breakers (scope TEXT PRIMARY KEY, opened REAL NOT NULL,
               until REAL NOT NULL, reason TEXT NOT NULL)""",
        """CREATE TABLE commands (seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL,
               kind TEXT NOT NULL, by TEXT, reason TEXT, time REAL NOT NULL)""",
        "CREATE INDEX commands_run ON commands (run_id)",
        "CREATE INDEX runs_owner ON runs (owner, status)",
    ],
}

RUN_MARKS = ",".join("?" * 19)
# ON CONFLICT ... DO NOTHING, not INSERT OR IGNORE: only the uniqueness conflict is the
# expected duplicate; a NOT NULL or type violation must fail loudly (StoreRejected).
INSERT_DECISION = (
    "INSERT INTO decisions (source, event_id, rule, key, outcome, reason, time, incident_id, "
    "run_id) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (source, event_id, rule) DO NOTHING")
UPSERT_INCIDENT = (
    "INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
    "status=excluded.status, closed=excluded.closed, events=excluded.events, "
    "run_id=excluded.run_id, outcome=excluded.outcome")
RUN_COLUMNS = ("id", "incident_id", "rule", "key", "kind", "target", "input", "status",
                "created", "started", "finished", "reason", "ctx", "outcome", "event",
                "progress", "owner", "epoch", "version")
# Fenced: the epoch belongs to claim_runs, and a save changes the stored run only while it
# is still this replica's under the epoch it holds it under (the last two parameters).
SAVE_RUN = (f"INSERT INTO runs VALUES ({RUN_MARKS}) ON CONFLICT (id) DO UPDATE SET "
             + ", ".join(f"{c}=excluded.{c}" for c in RUN_COLUMNS if c not in ("id", "epoch"))
             + " WHERE runs.owner=? AND runs.epoch=?")
SAVE_STEP = ("INSERT OR REPLACE INTO steps SELECT ?,?,?,?,?,?,?,?,?,?,?,? WHERE EXISTS "
             "(SELECT 1 FROM runs WHERE id=? AND owner=? AND epoch=?)")
# an engine update of a stored run (a queued run started, or cancelled): this replica takes it
UPDATE_RUN = (f"INSERT INTO runs VALUES ({RUN_MARKS}) ON CONFLICT (id) DO UPDATE SET "
               + ", ".join(f"{c}=excluded.{c}" for c in RUN_COLUMNS
                           if c not in ("id", "epoch"))
               + ", epoch=runs.epoch+1 RETURNING epoch")

AUDIT_COLUMNS = ("time", "request", "who", "role", "action", "target", "params", "status",
                 "outcome", "client")
APPEND_AUDIT = (f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) "
                f"VALUES ({','.join('?' * len(AUDIT_COLUMNS))})")
SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)}, seq FROM audit"
