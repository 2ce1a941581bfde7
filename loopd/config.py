"""pydantic models of loopd.yaml, with ``LOOPD_*`` environment overrides.

Paths in the file are relative to the file's own directory. Overrides:
``LOOPD_LISTEN``, ``LOOPD_STORE_PATH``, ``LOOPD_LOG_FORMAT``, ``LOOPD_LOG_LEVEL``,
``LOOPD_KAFKA_BOOTSTRAP`` (every kafka source), ``LOOPD_MQTT_HOST`` /
``LOOPD_MQTT_PORT`` (every mqtt source).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from loopd import validation, yamlfile
from loopd.errors import ConfigError
from loopd.policy import GlobalGuards
from loopd.units import parse_duration as parse_duration
from loopd.units import parse_size as parse_size

# "500ms", "10s", "1m" like everywhere else in loopd's files, or plain seconds
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


def _size(v: object) -> int:
    """A size with units, or bytes; anything else (a list, true) is refused by name."""
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError("must be a size: bytes or a number with KiB/MiB/kB/MB")
    return parse_size(v)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SourceBase(Strict):
    name: str
    max_payload: int = 1024 * 1024
    telemetry: bool = True  # keep the latest values per event key for conditions

    @field_validator("max_payload", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return _size(v)


class WebhookSourceConfig(_SourceBase):
    """Generic events posted to ``POST /v1/events``."""

    type: Literal["webhook"]


class AlertmanagerSourceConfig(_SourceBase):
    """Alertmanager webhook payloads (version 4) posted to ``POST /v1/alertmanager``."""

    type: Literal["alertmanager"]
    telemetry: bool = False  # alerts are not telemetry


REPLICA = "{replica}"


def expand_replica(template: str, replica: str) -> str:
    """``template`` with every ``{replica}`` replaced by this replica's name."""
    return template.replace(REPLICA, replica)


def mqtt_client_id(config: MqttSourceConfig | MqttSinkConfig, replica: str) -> str:
    """The MQTT client id of ``config``'s connection on ``replica``: ``client_id`` with
    ``{replica}`` expanded, else ``loopd-<replica>-<name>``."""
    if config.client_id is not None:
        return expand_replica(config.client_id, replica)
    return f"loopd-{replica}-{config.name}"


def _replica_template(v: str | None) -> str | None:
    """A name that may contain ``{replica}`` and no other placeholder (a ``{host}`` typed
    for ``{replica}`` would otherwise become a literal name shared by every replica)."""
    if v is None:
        return v
    if not v.strip():
        raise ValueError("must not be empty")
    rest = v.replace(REPLICA, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"only the {REPLICA} placeholder is expanded, got {v!r}")
    return v


ReplicaTemplate = Annotated[str | None, AfterValidator(_replica_template)]


def _share_group(v: str | None) -> str | None:
    # the group is one topic level of "$share/GROUP/filter" (MQTT 5 4.8.2)
    if v is not None and (not v or any(c in v for c in "/+#")):
        raise ValueError(f"a share group is one non-empty topic level without / + #, got {v!r}")
    return v


class MqttSourceConfig(_SourceBase):
    """An MQTT broker's topics. ``client_id`` (default ``loopd-{replica}-<name>``) may name
    ``{replica}``: each replica needs its own, since a broker disconnects the older of two
    clients with one id. ``shared: GROUP`` subscribes to ``$share/GROUP/<filter>`` so that
    each message goes to one replica of the group, not to all of them."""

    type: Literal["mqtt"]
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topics: list[str] = Field(min_length=1)
    qos: Literal[0, 1, 2] = 1  # 2 subscribes at 1 (acks wait for the decision: sources/mqtt.py)
    client_id: ReplicaTemplate = None
    shared: Annotated[str | None, AfterValidator(_share_group)] = None
    username: str | None = None
    password_ref: str | None = None
    keepalive: int = 30


class KafkaSourceConfig(_SourceBase):
    type: Literal["kafka"]
    bootstrap: str = "127.0.0.1:9092"
    topics: list[str] = Field(min_length=1)
    group: str = "loopd"
    # static membership (KIP-345): a restarted member with the same id gets its partitions
    # back without a rebalance; "{replica}" is this replica's name, e.g. a StatefulSet pod's
    # (Kafka 2.3+; tansu 0.6 rebalances forever after a static member rejoins)
    group_instance_id: ReplicaTemplate = None
    dead_letter_topic: str | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    commit_interval: Duration = 0.5
    session_timeout: Duration = 10.0  # consumer group session: how fast a dead member is noticed
    # every broker call (connect, commit, probe, dead-letter send, stop) is bounded by this
    request_timeout: Duration = 10.0
    probe_interval: Duration = 3.0  # how often the broker is asked whether it still answers
    # how much one fetch from the brokers may bring (a soft limit: a larger record still
    # comes, alone); the fetched bytes and their records are held until handed over, so
    # this bounds the memory a backlog takes: 1 MiB is about 2,800 alerts (at most what
    # the protocol's 32-bit field holds)
    fetch_max_bytes: int = Field(default=1024 * 1024, ge=1024, le=2**31 - 1)

    @field_validator("fetch_max_bytes", mode="before")
    @classmethod
    def _fetch_size(cls, v: object) -> int:
        return _size(v)


class SimFault(Strict):
    at: Duration                # seconds after start
    host: str
    service: str
    stuck: bool = False         # no restart fixes it

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, v: int | float | str) -> float:
        return parse_duration(v)


class SimSourceConfig(_SourceBase):
    """A simulated fleet (``loopd demo``): telemetry from hosts whose services degrade."""

    type: Literal["sim"]
    hosts: list[str] = Field(min_length=1)
    services: list[str] = Field(min_length=1)
    interval: Duration = 1.0
    recovery: Duration = 2.0    # seconds from a restart to healthy again
    faults: list[SimFault] = Field(default_factory=list)

    @field_validator("interval", "recovery", mode="before")
    @classmethod
    def _durations(cls, v: int | float | str) -> float:
        return parse_duration(v)


class KafkaSinkConfig(Strict):
    """A Kafka broker loopd only publishes to (publish actions, outcome events)."""

    type: Literal["kafka"]
    name: str
    bootstrap: str = "127.0.0.1:9092"


class MqttSinkConfig(Strict):
    """An MQTT broker loopd only publishes to."""

    type: Literal["mqtt"]
    name: str
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: ReplicaTemplate = None  # like a source's; the bus adds "-pub"
    username: str | None = None
    password_ref: str | None = None


SinkConfig = Annotated[KafkaSinkConfig | MqttSinkConfig, Field(discriminator="type")]


def _prometheus_url(v: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL without credentials (they would end up in
    logs: use the source's references), query or fragment; never echoed back."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. "
                         "http://prometheus:9090")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials: use username + password_ref or "
                         "bearer_token_ref")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return v


def _env_or_file(v: str | None) -> str | None:
    """A secret reference the source can resolve itself (``env:`` or ``file:``)."""
    if v is not None and v.partition(":")[0] not in ("env", "file"):
        raise ValueError("must be a reference: env:VAR or file:/path (the value is not shown)")
    return v


SecretRef = Annotated[str | None, AfterValidator(_env_or_file)]


class PromQLQuery(Strict):
    """One query of a ``type: promql`` source: each series of its result is an event on
    topic ``promql/<name>``, keyed by the series' ``key_label`` label."""

    name: str
    expr: str
    key_label: str = "instance"

    @field_validator("name")
    @classmethod
    def _topic_level(cls, v: str) -> str:
        if not v or not all(c.isascii() and (c.isalnum() or c in "_.:-") for c in v):
            raise ValueError(f"must be one topic level (letters, digits, _ . : -), got {v!r}")
        return v

    @field_validator("expr")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("key_label")
    @classmethod
    def _label_name(cls, v: str) -> str:
        if not v or v[0].isdigit() or not all(c.isascii() and (c.isalnum() or c == "_")
                                              for c in v):
            raise ValueError(f"must be a Prometheus label name, got {v!r}")
        return v


class PromQLSourceConfig(_SourceBase):
    """Queries a Prometheus evaluates every ``interval`` (loopd/sources/promql.py): alerts
    without Alertmanager. ``timeout`` (default: 10s, at most the interval) bounds each
    query; ``max_payload`` each answer. Behind auth: ``bearer_token_ref``, or ``username``
    with ``password_ref`` (env: or file: references)."""

    type: Literal["promql"]
    url: Annotated[str, AfterValidator(_prometheus_url)]
    interval: Duration = Field(default=30.0, gt=0)
    timeout: Duration | None = Field(default=None, gt=0)
    queries: list[PromQLQuery] = Field(min_length=1)
    bearer_token_ref: SecretRef = None
    username: str | None = None
    password_ref: SecretRef = None
    max_payload: int = 16 * 1024 * 1024  # a result of ~100,000 series
    max_series: int = Field(default=10_000, ge=1)  # per query and round; the rest dropped
    telemetry: bool = False  # every query's value and labels would overwrite the others'

    @property
    def query_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(10.0, self.interval)

    @field_validator("queries")
    @classmethod
    def _distinct_names(cls, v: list[PromQLQuery]) -> list[PromQLQuery]:
        names = [q.name for q in v]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:  # one topic, one firing set: two queries cannot share a name
            raise ValueError(f"duplicate query name(s): {', '.join(duplicates)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PromQLSourceConfig:
        if self.timeout is not None and self.timeout > self.interval:
            raise ValueError(f"timeout {self.timeout:g}s is longer than the interval "
                             f"{self.interval:g}s")
        if (self.username is None) != (self.password_ref is None):
            raise ValueError("basic auth needs both username and password_ref")
        if self.bearer_token_ref is not None and self.username is not None:
            raise ValueError("give bearer_token_ref or username + password_ref, not both")
        return self



class ScrapeSourceConfig(_SourceBase):
    """Prometheus ``/metrics`` endpoints loopd scrapes itself every ``interval``: each of
    ``targets`` (``host:port``, or a URL) and, with ``inventory``, every inventory entity
    that has a ``metrics_url`` (loopd/sources/scrape.py)."""

    type: Literal["scrape"]
    interval: Duration = Field(default=15.0, gt=0)
    timeout: Duration | None = Field(default=None, gt=0)  # default: see scrape_timeout
    targets: list[str] = Field(default_factory=list)
    # also scrape the inventory's entities with a metrics_url: off unless asked, since
    # every scrape source (and every replica) would scrape each of them
    inventory: bool = False
    metrics_path: str = "/metrics"  # for targets given as host:port
    metrics: list[str] = Field(default_factory=list)  # allow list of globs; empty: all
    drop: list[str] = Field(default_factory=list)     # deny list of globs
    rate: list[str] = Field(default_factory=list)     # counters (globs) sent as rates
    max_series: int = Field(default=5000, ge=1)       # per target and scrape
    honor_labels: bool = False
    job: str | None = None  # the ``job`` label; default: the source's name
    # a scrape's body, decompressed: a node exporter's is 100-300 kB, and a body's parse
    # costs memory and CPU in proportion (what a hostile target could send)
    max_payload: int = 16 * 1024 * 1024

    @field_validator("metrics", "drop", "rate")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        import re  # only here: the one pattern of loopd.yaml checked with a regex

        for glob in v:
            if not re.fullmatch(r"(?:[A-Za-z0-9_:*?]|\[!?[A-Za-z0-9_:-]+\])+", glob):
                raise ValueError(f"{glob!r} is not a glob of metric names (letters, digits, "
                                 "_ and :, with * ? and [...] as wildcards)")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for target in v:
            scrape_url(target, "/metrics")  # raises ValueError naming the target
        return v

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> ScrapeSourceConfig:
        if self.timeout is not None and self.timeout >= self.interval:
            raise ValueError(f"timeout ({self.timeout:g}s) must be below the interval "
                             f"({self.interval:g}s)")
        return self

    @property
    def scrape_timeout(self) -> float:
        """``timeout``, else 80% of the interval and at most 10 s (Prometheus's default),
        so a round is over before the next one starts."""
        return self.timeout if self.timeout is not None else min(10.0, 0.8 * self.interval)


def scrape_url(target: str, path: str) -> str:
    """The URL to scrape for ``target``: ``host:port`` becomes ``http://host:port<path>``,
    a URL stays as it is; anything else is a ValueError naming it."""
    from urllib.parse import urlsplit

    url = target if "://" in target else f"http://{target}{path}"
    # credentials first, before anything that could quote the target: the URL names the
    # target in labels, logs and errors, so it must hold no secret (nor may a message
    # about its other faults show one)
    authority = url.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    if "@" in authority:
        raise ValueError("a target URL must not carry credentials (user:password@); "
                         "the value is not shown")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"target {target!r} is neither host:port nor an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or (
            "://" not in target and port is None):
        raise ValueError(f"target {target!r} is neither host:port nor an http(s) URL")
    return url


SourceConfig = Annotated[
    WebhookSourceConfig | AlertmanagerSourceConfig | MqttSourceConfig | KafkaSourceConfig
    | SimSourceConfig | PromQLSourceConfig | ScrapeSourceConfig,
    Field(discriminator="type"),
]


class PoolConfig(Strict):
    """The Postgres store's connection pool, per replica (plus one LISTEN connection)."""

    min: int = Field(default=2, ge=1)
    max: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> PoolConfig:
        if self.max < self.min:
            raise ValueError(f"pool.max ({self.max}) is below pool.min ({self.min})")
        return self


def _dsn_problem(value: str) -> str | None:
    """What is wrong with a ``store.dsn`` value, never showing it: a reference must be well
    formed; anything else must be a connection string without a password."""
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    from loopd.catalog.credentials import HIDDEN, SCHEMES, USAGE, parse_reference

    scheme = value.partition(":")[0]
    if scheme in SCHEMES:
        try:
            parse_reference(value)
        except ConfigError as exc:
            return exc.message
        return None
    try:
        params = conninfo_to_dict(value)
    except PsycopgError:
        return f"neither a reference ({USAGE}) nor a PostgreSQL connection string; {HIDDEN}"
    if params.get("password"):
        return (f"holds a password: give the DSN by reference instead ({USAGE}); "
                f"{HIDDEN}")
    return None


class StoreConfig(Strict):
    """``type: sqlite`` (one file, ``path``) or ``type: postgres`` (``dsn``, shared by
    several replicas). The DSN is a secret reference (``env:VAR``, ``file:/path``,
    ``dir:KEY``, ``exec:COMMAND``) resolved when the store opens, or a connection string
    without a password (``postgresql://loopd@db/loopd``, the password then comes from
    libpq's ``PGPASSWORD`` or ``.pgpass``); a literal password is refused."""

    type: Literal["sqlite", "postgres"] = "sqlite"
    path: Path = Path("var/loopd.db")
    dsn: str | None = None
    # where LISTEN connects when the pool goes through PgBouncer in transaction mode (its
    # connections do not keep a LISTEN); default: dsn
    listen_dsn: str | None = None
    pool: PoolConfig = PoolConfig()
    timeout: Duration = Field(default=10.0, gt=0)  # connect, wait for a connection, statement
    batch_max: int = 2000
    batch_wait: Duration = 0.002
    # several replicas: a replica silent (no heartbeat) for this long loses its runs to
    # another; each replica looks for such runs, commands and evidence every ``poll``
    lease: Duration = Field(default=15.0, gt=0)
    poll: Duration = Field(default=1.0, gt=0)

    @field_validator("dsn", "listen_dsn")
    @classmethod
    def _secret_safe(cls, v: str | None) -> str | None:
        problem = _dsn_problem(v) if v is not None else None
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _for_type(self) -> StoreConfig:
        if self.type == "postgres":
            if self.dsn is None:
                raise ValueError("a postgres store needs dsn (e.g. dsn: env:LOOPD_PG_DSN)")
            if "path" in self.model_fields_set:
                raise ValueError("path is for the sqlite store only")
        else:
            for name in ("dsn", "listen_dsn"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for the postgres store only")
            if "pool" in self.model_fields_set:
                raise ValueError("pool is for the postgres store only")
        return self


class LogConfig(Strict):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class EngineConfig(Strict):
    queue_size: int = Field(default=1000, ge=1)  # bounded: a full queue pauses the sources
    max_concurrent_runs: int = Field(default=64, ge=1)
    dedup_window: int = Field(default=200_000, ge=1000)
    # bounded memory per entity key (loopd_memory_evictions_total counts what goes)
    telemetry_ttl: Duration = 86400.0     # a key's latest telemetry is forgotten after this
    telemetry_max_keys: int = Field(default=100_000, ge=1)
    guard_memory_max_keys: int = Field(default=100_000, ge=1000)  # per memory: throttle,
    # breaker, flapping, for: timers; entries whose windows have passed go first
    # liveness (/healthz) fails when events wait this long with no batch written
    stall_after: Duration = Field(default=60.0, gt=0)


class TokenConfig(Strict):
    """One API token: a name (shown in logs and the audit trail), a role, and where the
    secret lives (``env:VAR``, ``file:/path``, ``dir:KEY``, ``exec:COMMAND``): never the
    secret itself."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["viewer", "ingest", "operator", "admin"]
    token: str = Field(min_length=1)

    def __repr__(self) -> str:  # the reference only; still, keep it out of tracebacks
        return f"TokenConfig(name={self.name!r}, role={self.role!r})"


class AuthConfig(Strict):
    """``api.auth``: the tokens the API accepts, and the routes left open (Prometheus)."""

    tokens: list[TokenConfig] = Field(min_length=1)
    open: list[Literal["healthz", "readyz", "metrics"]] = Field(default_factory=list)
    # per client address: past max_failures refused authentications within failure_window
    # the address gets 429 (with Retry-After) until the window has passed
    max_failures: int = Field(default=10, ge=1)
    failure_window: Duration = Field(default=60.0, gt=0)

    @field_validator("tokens")
    @classmethod
    def _distinct_names(cls, v: list[TokenConfig]) -> list[TokenConfig]:
        seen: set[str] = set()
        for t in v:
            if t.name in seen:
                raise ValueError(f"duplicate token name {t.name!r}")
            seen.add(t.name)
        return v


class TlsConfig(Strict):
    """``api.tls``: serve HTTPS; ``client_ca`` turns on mutual TLS (a client without a
    certificate signed by it is refused). The files are read again on SIGHUP/reload."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class ApiConfig(Strict):
    """The HTTP API's server: who may call it (auth, tls, allowed hosts and origins), and
    limits so slow or idle clients cannot exhaust it."""

    # None: nothing configured (only a loopback listen is allowed); "none": explicitly off
    auth: AuthConfig | Literal["none"] | None = None
    tls: TlsConfig | None = None
    # Host header names accepted (DNS rebinding); empty: loopback names, the listen host
    # and the address a connection arrived on. "*" (any) needs auth
    allowed_hosts: list[str] = Field(default_factory=list)
    # Origin headers accepted besides the API's own origin, e.g. "https://ops.example"
    allowed_origins: list[str] = Field(default_factory=list)

    # a connection that sends no (complete) request head for this long is closed: it
    # bounds both idle keep-alive connections and slowly sent headers
    idle_timeout: Duration = Field(default=60.0, gt=0)
    body_timeout: Duration = Field(default=30.0, gt=0)  # reading one request's body: 408
    max_connections: int = Field(default=1024, ge=1)  # past it: 503 and closed
    # -- request limits (loopd.api.limits, loopd.api.ingest) and the audit trail's view of
    # client addresses (loopd.api.audit) --
    max_body: int = 64 * 1024  # any route but ingest (those keep their source's max_payload)
    max_body_unused: int = 4 * 1024  # a route that takes no body (approve, reload, reads)
    max_batch: int = Field(default=1000, ge=1)  # events / alerts per ingest request: 413
    max_concurrent_ingest: int = Field(default=64, ge=1)  # past it: 503 + Retry-After
    queue_timeout: Duration = Field(default=5.0, gt=0)  # engine queue full this long: 503
    # X-Forwarded-For is believed only from these proxies (addresses or networks)
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)

    @field_validator("max_body", "max_body_unused", mode="before")
    @classmethod
    def _body_size(cls, v: object) -> int:
        size = _size(v)
        if size < 0:
            raise ValueError(f"a body size cannot be negative ({v!r})")
        return size

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_word(cls, v: object) -> object:
        if isinstance(v, str) and v != "none":  # not echoed: it could be a pasted token
            raise ValueError("must be a mapping with tokens: [...], or the word none")
        return v

    @model_validator(mode="after")
    def _wildcard_needs_auth(self) -> ApiConfig:
        if "*" in self.allowed_hosts and not isinstance(self.auth, AuthConfig):
            raise ValueError("allowed_hosts '*' (any Host header) needs api.auth tokens")
        return self


class PrometheusConfig(Strict):
    """The Prometheus HTTP API that confirm tasks query (``query:``)."""

    url: str
    timeout: Duration = 10.0


class OutcomesConfig(Strict):
    """Where the outcome event of every finished run is published (besides loopd itself)."""

    bus: str | None = None  # the name of a kafka or mqtt source whose broker gets it
    topic: str = "loopd.outcomes"


class AlertmanagerConfig(Strict):
    """The Alertmanager API whose silences suppress matching events."""

    url: str
    refresh: Duration = 15.0
    timeout: Duration = 5.0


class SshConfig(Strict):
    """The ssh runner. ``unlisted_hosts``: connect to a host that is not in the inventory
    (at its own name, with the daemon user's agent and keys). Off by default: a rule's
    ``host: "{{ event.labels.instance }}"`` would let an event name any host."""

    unlisted_hosts: bool = False


class SecretsConfig(Strict):
    """How credential references are resolved (loopd/catalog/backends.py): ``dir:KEY``
    reads ``dir/KEY``; values stay in memory only, for ``ttl`` (env/file/dir; 0 = read
    at each use) or ``exec_ttl`` (exec helpers) seconds, at most ``max_cached`` of them."""

    dir: Path | None = None  # absolute: a mounted secret volume is not part of the config
    ttl: Duration = 0.0
    exec_ttl: Duration = 300.0
    exec_timeout: Duration = Field(default=10.0, gt=0)
    max_cached: int = Field(default=1024, ge=0)

    @field_validator("dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"secrets.dir must be an absolute path, got {str(v)!r}")
        return v


class LoopdConfig(Strict):
    listen: str = "127.0.0.1:8080"
    sources: list[SourceConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(default_factory=list)
    rules: list[Path] = Field(default_factory=lambda: [Path("rules")])
    packs: list[Path] = Field(default_factory=lambda: [Path("packs")])
    inventory: Path | None = None
    pack_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    store: StoreConfig = StoreConfig()
    prometheus: PrometheusConfig | None = None
    alertmanager: AlertmanagerConfig | None = None
    guards: GlobalGuards = GlobalGuards()
    outcomes: OutcomesConfig = OutcomesConfig()
    log: LogConfig = LogConfig()
    engine: EngineConfig = EngineConfig()
    api: ApiConfig = ApiConfig()
    secrets: SecretsConfig = SecretsConfig()
    ssh: SshConfig = SshConfig()
    source_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        port = v.rpartition(":")[2]
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"must be HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> LoopdConfig:
        seen: set[str] = set()
        for s in [*self.sources, *self.sinks]:
            if s.name in seen:
                raise ValueError(f"duplicate source/sink name {s.name!r}")
            seen.add(s.name)
        bus = self.outcomes.bus
        buses = {s.name for s in [*self.sources, *self.sinks] if s.type in ("kafka", "mqtt")}
        if bus is not None and bus not in buses:
            raise ValueError(f"outcomes.bus {bus!r} is not a kafka or mqtt source or sink")
        return self

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)


def load_config(path: Path | str, *, listen: str | None = None) -> LoopdConfig:
    """Read, override from the environment, validate and resolve relative paths.

    ``listen`` is the command line's ``--listen``. Every problem is reported, each as
    ``file:line: field: message``, or with the flag or environment variable instead of
    ``file:line`` when the value came from there.
    """
    path = Path(path)
    try:
        raw, node = yamlfile.compose(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", origin=str(path)) from None
    except yaml.YAMLError as exc:
        where, message = yamlfile.error_where(exc, path)
        raise ConfigError(message, origin=where) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping", origin=str(path))
    overrides = _apply_env(raw)
    if listen:
        raw["listen"] = listen
        overrides[("listen",)] = "--listen"
    try:
        cfg = LoopdConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, raw, node, path, overrides) from None
    base = path.parent

    def rel(p: Path) -> Path:
        return p if str(p) == ":memory:" else Path(os.path.normpath(base / p))

    return cfg.model_copy(update={
        "rules": [rel(p) for p in cfg.rules],
        "packs": [rel(p) for p in cfg.packs],
        "inventory": rel(cfg.inventory) if cfg.inventory else None,
        "store": cfg.store.model_copy(update={"path": rel(cfg.store.path)}),
        "api": _api_paths(cfg.api, rel),
        "source_file": path,
    })


def _union_tags(union: Any) -> list[str]:
    """The ``type`` values of a discriminated union of models, in declaration order."""
    members = get_args(get_args(union)[0])
    return [get_args(m.model_fields["type"].annotation)[0] for m in members]


# how an unknown or missing ``type`` is explained
_KINDS = {"sources": ("source", _union_tags(SourceConfig)),
          "sinks": ("sink", _union_tags(SinkConfig))}


def _config_error(exc: ValidationError, raw: dict[str, Any], node: yaml.Node | None,
                  path: Path, overrides: dict[validation.Path, str]) -> ConfigError:
    """One ConfigError for every problem of ``exc``, the first as its origin and message,
    the others on the lines after it, in the order of the file."""
    located = []
    for problem in validation.problems(exc, raw, _KINDS):
        origin = next((name for keys, name in overrides.items()
                       if problem.path[:len(keys)] == keys), None)
        if origin is None:
            origin = yamlfile.line_of(node, problem.path, path)
        message = f"{problem.field}: {problem.message}" if problem.path else problem.message
        located.append((origin, message))
    located.sort(key=lambda p: _line_number(p[0], path))
    (origin, message), rest = located[0], located[1:]
    return ConfigError("".join([message, *(f"\n{o}: {m}" for o, m in rest)]), origin=origin)


def _line_number(origin: str, path: Path) -> int:
    """The line of a ``file:line`` origin; 0 for the file itself, a flag or a variable."""
    line = origin.removeprefix(f"{path}:")
    return int(line) if line.isdigit() else 0


def _api_paths(api: ApiConfig, rel: Callable[[Path], Path]) -> ApiConfig:
    if api.tls is None:
        return api
    tls = api.tls
    return api.model_copy(update={"tls": tls.model_copy(update={
        "cert": rel(tls.cert), "key": rel(tls.key),
        "client_ca": rel(tls.client_ca) if tls.client_ca else None})})


def _apply_env(raw: dict[str, Any]) -> dict[validation.Path, str]:
    """Apply the ``LOOPD_*`` overrides to ``raw``; what each changed, so that an error in
    a value names the variable it came from rather than a line of the file."""
    env = os.environ
    changed: dict[validation.Path, str] = {}
    if "LOOPD_LISTEN" in env:
        raw["listen"] = env["LOOPD_LISTEN"]
        changed[("listen",)] = "environment variable LOOPD_LISTEN"
    store = raw.get("store")
    postgres = isinstance(store, dict) and store.get("type") == "postgres"
    for var, section, key in (
        ("LOOPD_STORE_PATH", "store", "path"), ("LOOPD_LOG_FORMAT", "log", "format"),
        ("LOOPD_LOG_LEVEL", "log", "level"),
    ):
        if var == "LOOPD_STORE_PATH" and postgres:
            continue  # a file path means nothing to the postgres store
        if var in env:
            sub = raw.setdefault(section, {})
            if isinstance(sub, dict):
                sub[key] = env[var]
                changed[(section, key)] = f"environment variable {var}"
    sources = raw.get("sources")
    for i, src in enumerate(sources if isinstance(sources, list) else []):
        if not isinstance(src, dict):
            continue
        for var, kind, key in (("LOOPD_KAFKA_BOOTSTRAP", "kafka", "bootstrap"),
                               ("LOOPD_MQTT_HOST", "mqtt", "host"),
                               ("LOOPD_MQTT_PORT", "mqtt", "port")):
            if src.get("type") == kind and var in env:
                src[key] = env[var]
                changed[("sources", i, key)] = f"environment variable {var}"
    return changed
