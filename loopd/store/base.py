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
  is this replica or whose owner's heartbeat is older than the lease.
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


@dataclass(slots=True)
class CommitResult:
    """What a commit created; the engine brings its memory in line with it."""

    duplicates: set[tuple[str, str, str]] = field(default_factory=set)  # source, event, rule
    conflicts: dict[str, IncidentRecord] = field(default_factory=dict)  # new id -> open one
    skipped_runs: set[str] = field(default_factory=set)  # runs not created (see above)

    def __bool__(self) -> bool:
        return bool(self.duplicates or self.conflicts or self.skipped_runs)

    def merge(self, other: CommitResult) -> None:
        self.duplicates |= other.duplicates
        self.conflicts.update(other.conflicts)
        self.skipped_runs |= other.skipped_runs


# Decisions whose run the batch creates (the others only join or suppress).
RUN_OUTCOMES = frozenset({"run_created", "queued", "restarted"})

Mark = tuple[int, int, int, int, int, int]


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
    # transaction of the decision (or run end) that changed it
    kv: dict[tuple[str, str], JSON] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.decisions or self.incidents or self.runs or self.run_updates
                    or self.timers_set or self.timers_cleared or self.kv)

    def mark(self) -> Mark:
        """Where the records of the next event start (see ``part``)."""
        return (len(self.events), len(self.decisions), len(self.runs), len(self.run_updates),
                len(self.timers_set), len(self.timers_cleared))

    def part(self, start: Mark, end: Mark) -> Batch:
        """The records written between two marks, e.g. those of one event, so that a
        batch the store rejects can be split until the culprit is found. Incidents go
        with the decisions that touched them."""
        decisions = self.decisions[start[1]:end[1]]
        ids = {d.incident_id for d in decisions}
        return Batch(
            self.events[start[0]:end[0]], decisions,
            {i: inc for i, inc in self.incidents.items() if i in ids},
            self.runs[start[2]:end[2]], self.run_updates[start[3]:end[3]],
            self.timers_set[start[4]:end[4]], self.timers_cleared[start[5]:end[5]],
            dict(self.kv))  # the latest guard memory goes with every part


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

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None
                         ) -> set[str]:
        """The ids of the runs in ``statuses`` this replica may execute now, claimed for it
        (epoch bumped): its own, unowned ones, and those of replicas silent for longer than
        ``lease`` (default: the store's)."""
        ...

    async def heartbeat(self) -> None:
        """This replica is alive: its runs stay its own (called every few seconds)."""
        ...

    async def load_state(self, *, since: float, recent: int) -> EngineState: ...

    async def save_run(self, run: RunRecord) -> None: ...

    async def save_step(self, step: StepRecord) -> None: ...

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None: ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(self, *, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        ...

    async def runs_in_status(self, statuses: tuple[str, ...]) -> list[RunRecord]: ...

    async def steps(self, run_id: str) -> list[StepRecord]: ...

    async def list_incidents(self, *, status: str | None = None,
                             limit: int = 100) -> list[IncidentRecord]: ...

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]: ...

    async def count_decisions(self, *, rule: str | None = None) -> int: ...

    async def get_event(self, source: str, event_id: str) -> EventRecord | None: ...

    async def kv_get(self, namespace: str, key: str) -> JSON:
        """A value packs keep between runs (e.g. a device's last known good config)."""
        ...

    async def kv_put(self, namespace: str, key: str, value: JSON) -> None: ...

    async def append_audit(self, record: AuditRecord) -> None:
        """Append ``record`` to the audit trail, durable when this returns. There is no
        update and no delete."""
        ...

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        """The audit records matching ``query``, newest first, at most ``query.limit``."""
        ...
