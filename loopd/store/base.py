"""The Store protocol: what loopd keeps durably, and the records it keeps.

Contract (every implementation passes ``tests/unit/test_store_contract.py``):

* ``commit(batch)`` writes the whole batch in one transaction or raises
  ``StoreError`` (transient: the store is down) or ``StoreRejected`` (a record
  can never be written); nothing of a failed batch is visible afterwards.
* **The store is the arbiter, not memory.** A decision is unique per
  ``(source, event_id, rule)``; ``commit`` returns a ``CommitResult`` saying
  which decisions were already there (``duplicates``). A run and a new incident
  are created only in the transaction that inserts their new decision: a
  duplicate decision creates nothing, so a redelivered event can never create a
  second run, whichever process decided it first.
* At most one open incident per ``(rule, key)``, enforced by the database: a
  new incident that meets an open one of another id is not created; its decision
  becomes ``joined`` to the open one (``conflicts``) and its run is not created.
* Runs belong to one replica at a time (``owner``, ``epoch``): runs are created
  owned by the committing replica; ``claim_runs`` takes over runs whose owner
  is this replica or whose owner's heartbeat is older than the lease (Postgres:
  ``FOR UPDATE SKIP LOCKED``, so two replicas never claim one run), bumping the
  epoch. The store remembers the epoch it holds each run under (created by its
  commit, claimed, or first inserted by ``save_run``).
* **Every write of run state is fenced.** ``save_run`` and ``save_step`` write only
  while the stored run is owned by this replica under the epoch this store holds
  it under; otherwise they raise ``LeaseLost`` and write nothing (a paused former
  owner that wakes up cannot write). ``holds(run_id)`` reads the same check from
  the database (the lease check before an action). A run this store does not hold
  is refused too: claim it first.
* **Guards hold across replicas.** A new run in a batch may carry ``Limit``s
  (``Batch.limits[run.id]``). In the commit's transaction, serialized per scope
  (Postgres: ``pg_advisory_xact_lock``), the store counts what every replica
  admitted: ``window``: runs admitted in ``scope`` whose time is within ``per``
  seconds before this run's ``created``, refused at ``count``; ``open``: distinct
  keys of the scope whose incident is still open (other than this run's key),
  refused at ``count``; ``breaker``: refused while the scope's breaker is open at
  ``created``; ``opens``: created only when this very commit opened the scope's
  breaker (``Batch.breakers``: the escalation of one replica). A refused run is
  not created, nor the incident it opened; its decision becomes ``suppressed``
  with the limit's reason (``refused`` says which).
  An admitted run is counted in each scope of its limits; closing its incident
  ends its ``open`` count. A store that knows no other replica has been alive since it
  opened (SQLite, alone on its file) may count without checking: its engine's memory,
  rebuilt from the store at start, saw every run and decided exactly the same.
* Breakers are shared: ``Batch.breakers`` opens them (a breaker already open is
  left as it is; ``CommitResult.breakers_opened`` names those this commit opened,
  so exactly one replica escalates); ``breakers()`` lists the open ones;
  ``close_breaker`` closes one for every replica.
* Commands for a run (approve, reject, cancel) given to any replica reach its owner
  through ``send_command`` / ``commands``; events stored by any replica are read in
  order with ``events_since`` (confirmation evidence); ``wait_changed`` returns
  early when another replica wrote runs, commands or events (Postgres LISTEN/NOTIFY:
  a hint only, polling is the truth).
* ``load_state()`` returns everything the engine needs to carry on after a
  restart: open incidents, pending ``for:`` timers, recent run starts (for
  throttles) and recently decided event ids (for de-duplication).
* Run records and their steps are written as they change, so a crash leaves
  every run in the last state it reached.
* **The audit trail is append-only.** ``append_audit`` adds a record (raises
  ``StoreError`` when it cannot: the caller must not act unaudited); the store numbers
  records in the order appended (``seq``, as read back); ``audit(query)`` reads them
  newest first. Nothing updates
  or deletes a record: the SQLite table has triggers that abort both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

JSON = Any


@dataclass(slots=True)
class DecisionRecord:
    source: str
    event_id: str
    rule: str
    key: str | None
    outcome: str          # run_created | joined | suppressed | error
    reason: str | None
    time: float
    incident_id: str | None = None
    run_id: str | None = None
    seq: int = 0          # its position in the store, as read back (0 before it is stored)


@dataclass(frozen=True, slots=True)
class DecisionQuery:
    """Which decisions ``decisions(query)`` reads, newest first: each set field narrows;
    ``before`` (a ``seq``) pages back, ``since``/``until`` bound the decision's time."""

    rule: str | None = None
    key: str | None = None
    outcome: str | None = None
    source: str | None = None
    incident_id: str | None = None
    since: float | None = None
    until: float | None = None
    before: int | None = None
    limit: int = 100

    def matches(self, d: DecisionRecord) -> bool:
        return ((self.rule is None or d.rule == self.rule)
                and (self.key is None or d.key == self.key)
                and (self.outcome is None or d.outcome == self.outcome)
                and (self.source is None or d.source == self.source)
                and (self.incident_id is None or d.incident_id == self.incident_id)
                and (self.since is None or d.time >= self.since)
                and (self.until is None or d.time <= self.until)
                and (self.before is None or d.seq < self.before))

    def where(self, mark: str) -> tuple[str, list[Any]]:
        """The SQL ``WHERE`` of this query (``mark``: the driver's placeholder)."""
        terms, params = [], []
        for column, op, value in (
                ("rule", "=", self.rule), ("key", "=", self.key),
                ("outcome", "=", self.outcome), ("source", "=", self.source),
                ("incident_id", "=", self.incident_id), ("time", ">=", self.since),
                ("time", "<=", self.until), ("seq", "<", self.before)):
            if value is not None:
                terms.append(f"{column}{op}{mark}")
                params.append(value)
        return (" WHERE " + " AND ".join(terms)) if terms else "", params


DECISION_COLUMNS = "source, event_id, rule, key, outcome, reason, time, incident_id, run_id, seq"


@dataclass(slots=True)
class EventRecord:
    source: str
    id: str
    topic: str
    key: str | None
    time: float
    data: JSON


@dataclass(slots=True)
class IncidentRecord:
    id: str
    rule: str
    key: str
    status: str           # open | closed
    opened: float
    closed: float | None = None
    events: int = 1
    run_id: str | None = None
    outcome: str | None = None


@dataclass(slots=True)
class RunRecord:
    id: str
    incident_id: str | None
    rule: str | None
    key: str | None
    kind: str             # action | workflow
    target: str           # pack.action or pack.workflow
    input: JSON
    status: str           # see loopd.runs.states
    created: float
    started: float | None = None
    finished: float | None = None
    reason: str | None = None
    ctx: JSON = field(default_factory=dict)
    outcome: str | None = None
    event: JSON = None    # the event that started the run
    progress: JSON = None  # the workflow runner's resumable state (loopd.runs.runner)


    owner: str | None = None   # the replica executing it (see claim_runs)
    epoch: int = 0             # bumped by every claim: a takeover is visible
    version: int = 0           # bumped by every save


@dataclass(slots=True)
class StepRecord:
    run_id: str
    seq: int
    task: str
    action: str | None
    attempt: int
    status: str
    started: float
    finished: float | None = None
    input: JSON = None
    output: JSON = None
    error: str | None = None
    transition: str | None = None


@dataclass(slots=True)
class AuditRecord:
    """One API call that changes something (or was refused for a too-weak role).

    A call is recorded twice under one ``request`` id: before it acts (``status`` None,
    ``outcome`` "requested") and with its result (HTTP status and a short outcome), so an
    action is never taken without a record of it, and a missing result is visible.
    """

    time: float
    request: str          # shared by the records of one call
    who: str              # the principal's name (a token name, or anonymous)
    role: str
    action: str           # the route's name: approve_run, cancel_run, reload, ...
    target: str | None    # a run id, a breaker scope; None for reload
    params: JSON          # query parameters, secrets redacted
    status: int | None    # the HTTP status; None on the record written before acting
    outcome: str
    client: str | None    # the client's address
    seq: int = 0          # given by the store: the order of appending (as read back)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which audit records to read (each filter exact; ``since`` in epoch seconds)."""

    action: str | None = None
    who: str | None = None
    target: str | None = None
    since: float | None = None
    limit: int = 100

    def matches(self, record: AuditRecord) -> bool:
        return ((self.action is None or record.action == self.action)
                and (self.who is None or record.who == self.who)
                and (self.target is None or record.target == self.target)
                and (self.since is None or record.time >= self.since))


@dataclass(frozen=True, slots=True)
class Limit:
    """A guard the store checks for a new run against every replica's runs (see the module
    docstring): ``kind`` is ``window``, ``open`` or ``breaker``."""

    scope: str            # "fleet", "rule:<rule>", "key:<rule>|<key>", "group:<group>", ...
    kind: str
    count: int = 0
    per: float = 0.0
    guard: str = "budget"  # the guard named in the refused decision's reason
    reason: str = ""


def refusal_reason(limit: Limit) -> str:
    """The reason of a decision whose run a store-checked limit refused."""
    return f"guard {limit.guard}: {limit.reason} (counted across replicas)"


@dataclass(slots=True)
class BreakerRecord:
    scope: str            # a rule, or "rule|key"
    opened: float
    until: float
    reason: str


@dataclass(slots=True)
class CommandRecord:
    """A command for a run, given to any replica, carried out by the run's owner."""

    run_id: str
    kind: str             # approve | reject | cancel
    by: str | None
    reason: str | None
    time: float
    seq: int = 0          # given by the store, increasing


@dataclass(slots=True)
class ReplicaRecord:
    name: str
    host: str
    pid: int
    heartbeat: float


@dataclass(slots=True)
class CommitResult:
    """What a commit created; the engine brings its memory in line with it."""

    duplicates: set[tuple[str, str, str]] = field(default_factory=set)  # source, event, rule
    conflicts: dict[str, IncidentRecord] = field(default_factory=dict)  # new id -> open one
    skipped_runs: set[str] = field(default_factory=set)  # runs not created (see above)
    refused: dict[str, Limit] = field(default_factory=dict)  # run id -> the limit it met
    breakers_opened: set[str] = field(default_factory=set)  # scopes this commit opened

    def __bool__(self) -> bool:
        return bool(self.duplicates or self.conflicts or self.skipped_runs or self.refused
                    or self.breakers_opened)

    def merge(self, other: CommitResult) -> None:
        self.duplicates |= other.duplicates
        self.conflicts.update(other.conflicts)
        self.skipped_runs |= other.skipped_runs
        self.refused.update(other.refused)
        self.breakers_opened |= other.breakers_opened


# The statuses of runs that have not ended (loopd.runs.states: ACTIVE and queued; the
# store cannot import it) and the same as an SQL list.
LIVE = frozenset({"pending", "running", "waiting", "awaiting_approval", "queued"})
LIVE_STATUSES = "(" + ",".join(f"'{s}'" for s in sorted(LIVE)) + ")"

# Decisions whose run the batch creates (the others only join or suppress).
RUN_OUTCOMES = frozenset({"run_created", "queued", "restarted"})

Mark = tuple[int, int, int, int, int, int, int]


@dataclass(slots=True)
class Batch:
    """Everything one engine flush writes, in one transaction."""

    events: list[EventRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    incidents: dict[str, IncidentRecord] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    run_updates: list[RunRecord] = field(default_factory=list)  # runs already stored
    timers_set: list[tuple[str, str, float]] = field(default_factory=list)
    timers_cleared: list[tuple[str, str]] = field(default_factory=list)
    # (namespace, key) -> value, as kv_put writes it: the guards' memory changes in the
    # transaction of the decision (or run end) that changed it; None deletes the key
    kv: dict[tuple[str, str], JSON] = field(default_factory=dict)
    # run id -> the guards the store checks across replicas before creating the run
    limits: dict[str, list[Limit]] = field(default_factory=dict)
    breakers: list[BreakerRecord] = field(default_factory=list)  # breakers to open
    breakers_closed: list[str] = field(default_factory=list)  # scopes closed (the API)
    # kv writes made for one event (``put_kv``: correlation rows), in ``kv`` too and listed
    # here in order, so that a part carries its own segment's and no other's
    kv_marked: list[tuple[tuple[str, str], JSON]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events or self.decisions or self.incidents or self.runs
                    or self.run_updates
                    or self.timers_set or self.timers_cleared or self.kv or self.breakers
                    or self.breakers_closed)

    def not_duplicated(self, result: CommitResult) -> dict[str, IncidentRecord]:
        """After the decisions were inserted: a duplicate decision creates nothing, not
        its run (added to ``result.skipped_runs``), not the incident it opened; returns
        the incidents still to write."""
        if not result.duplicates:
            return self.incidents
        dup = [d for d in self.decisions
               if (d.source, d.event_id, d.rule) in result.duplicates]
        result.skipped_runs |= {d.run_id for d in dup if d.run_id and d.outcome in RUN_OUTCOMES}
        live = {d.incident_id for d in self.decisions
                if (d.source, d.event_id, d.rule) not in result.duplicates}
        return {i: inc for i, inc in self.incidents.items() if i in live}

    def put_kv(self, key: tuple[str, str], value: JSON) -> None:
        """A kv write of the segment being decided (``part`` carries it with that one)."""
        self.kv[key] = value
        self.kv_marked.append((key, value))

    def mark(self) -> Mark:
        """Where the records of the next event start (see ``part``)."""
        return (len(self.events), len(self.decisions), len(self.runs), len(self.run_updates),
                len(self.timers_set), len(self.timers_cleared), len(self.kv_marked))

    def part(self, start: Mark, end: Mark) -> Batch:
        """The records written between two marks, e.g. those of one event, so that a
        batch the store rejects can be split until the culprit is found. Incidents go
        with the decisions that touched them; kv writes made with ``put_kv`` with their
        segment (the latest of the segment), the others (the latest guard memory) with
        every part."""
        decisions = self.decisions[start[1]:end[1]]
        ids = {d.incident_id for d in decisions}
        kv = dict(self.kv)
        if self.kv_marked:
            for key, _ in self.kv_marked:
                kv.pop(key, None)
            kv.update(self.kv_marked[start[6]:end[6]])
        return Batch(
            self.events[start[0]:end[0]], decisions,
            {i: inc for i, inc in self.incidents.items() if i in ids},
            self.runs[start[2]:end[2]], self.run_updates[start[3]:end[3]],
            self.timers_set[start[4]:end[4]], self.timers_cleared[start[5]:end[5]],
            kv,
            {r.id: self.limits[r.id] for r in self.runs[start[2]:end[2]]
             if r.id in self.limits},
            list(self.breakers) if start[0] == 0 and start[1] == 0 else [],
            list(self.breakers_closed) if start[0] == 0 and start[1] == 0 else [])


@dataclass(slots=True)
class EngineState:
    open_incidents: list[IncidentRecord]
    for_timers: list[tuple[str, str, float]]          # rule, key, since
    run_starts: list[tuple[str, str, float]]          # rule, key, created
    recent_events: list[tuple[str, str]]              # source, event id


class Store(Protocol):
    replica: str   # the name this process writes and claims runs under
    lease: float   # seconds of silence after which a replica's runs may be taken over

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def commit(self, batch: Batch) -> CommitResult: ...

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None,
                         others_only: bool = False, exclude: frozenset[str] = frozenset()
                         ) -> dict[str, int]:
        """The runs in ``statuses`` this replica may execute now, claimed for it (epoch
        bumped; id -> the new epoch): unowned ones, those of replicas silent for longer
        than ``lease`` (default: the store's) and, unless ``others_only`` (the periodic
        takeover, while this replica executes its own), its own. A run's sub-workflow
        runs (``parent/task``) are claimed with it; runs in ``exclude`` (and theirs) are
        not (a task of this process still holds them under an older epoch)."""
        ...

    async def holds(self, run_id: str) -> bool:
        """Whether the stored run is still this replica's under the epoch this store holds
        it under (read from the database: the lease check before an action)."""
        ...

    def release(self, run_id: str) -> None:
        """Forget the epoch of a run this replica no longer executes (its task ended)."""
        ...

    async def replicas(self) -> list[ReplicaRecord]:
        """Every replica that registered, with its last heartbeat."""
        ...

    async def breakers(self) -> list[BreakerRecord]:
        """The breakers open now (``until`` in the future), whoever opened them."""
        ...

    async def close_breaker(self, scope: str) -> bool:
        """Close a breaker for every replica; False when it was not open."""
        ...

    async def send_command(self, command: CommandRecord) -> None:
        """Durable when this returns; its run's owner carries it out (see ``commands``)."""
        ...

    async def commands(self, after: int) -> list[CommandRecord]:
        """Commands with ``seq > after`` for the runs this replica owns that have not ended
        (``LIVE``), oldest first: a run taken over brings its commands along."""
        ...

    async def events_since(self, after: int, *, limit: int = 1000
                           ) -> list[tuple[int, EventRecord]]:
        """Events stored (by any replica) after position ``after``, in the order stored,
        with their positions; ``events_since(-1, limit=0)`` is cheap to ask for the
        position of the newest (use ``last_event``)."""
        ...

    async def last_event(self) -> int:
        """The position of the newest stored event (0 when none)."""
        ...

    async def wait_changed(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or earlier when another replica wrote runs,
        commands or events (a hint: the caller polls whatever it waits for)."""
        ...

    async def heartbeat(self) -> None:
        """This replica is alive: its runs stay its own (called every few seconds)."""
        ...

    async def load_state(self, *, since: float, recent: int) -> EngineState: ...

    async def save_run(self, run: RunRecord) -> None: ...

    async def save_step(self, step: StepRecord) -> None: ...

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None: ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(self, *, status: str | None = None, rule: str | None = None,
                        limit: int = 100) -> list[RunRecord]:
        """Runs newest first (by creation), of one status and/or one rule when given."""
        ...

    async def runs_in_status(self, statuses: tuple[str, ...]) -> list[RunRecord]: ...

    async def steps(self, run_id: str) -> list[StepRecord]: ...

    async def list_incidents(self, *, status: str | None = None,
                             limit: int = 100) -> list[IncidentRecord]: ...

    async def get_incident(self, incident_id: str) -> IncidentRecord | None: ...

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]: ...

    async def decisions(self, query: DecisionQuery) -> list[DecisionRecord]:
        """The decisions matching ``query``, newest first (highest ``seq``), at most
        ``query.limit``."""
        ...

    async def count_decisions(self, *, rule: str | None = None) -> int: ...

    async def get_event(self, source: str, event_id: str) -> EventRecord | None: ...

    async def kv_get(self, namespace: str, key: str) -> JSON:
        """A value packs keep between runs (e.g. a device's last known good config)."""
        ...

    async def kv_put(self, namespace: str, key: str, value: JSON) -> None: ...

    async def kv_scan(self, namespace: str, prefix: str = "") -> list[tuple[str, JSON]]:
        """Every (key, value) of ``namespace`` whose key starts with ``prefix``, ordered by
        key (the engine's correlation state at start, after a rebalance, one group's)."""
        ...

    async def append_audit(self, record: AuditRecord) -> None:
        """Append ``record`` to the audit trail, durable when this returns. There is no
        update and no delete."""
        ...

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        """The audit records matching ``query``, newest first, at most ``query.limit``."""
        ...
