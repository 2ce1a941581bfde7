"""loopd.yaml: sizes, durations, validation errors naming file and field, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopd.config import (
    AlertmanagerSourceConfig,
    KafkaSourceConfig,
    MqttSourceConfig,
    load_config,
    parse_duration,
    parse_size,
)
from loopd.errors import ConfigError
from tests.unit.conftest import REPO

ENV_VARS = ("LOOPD_LISTEN", "LOOPD_STORE_PATH", "LOOPD_LOG_FORMAT", "LOOPD_LOG_LEVEL",
            "LOOPD_KAFKA_BOOTSTRAP", "LOOPD_MQTT_HOST", "LOOPD_MQTT_PORT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "loopd.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, seconds", [
    (30, 30.0), (1.5, 1.5), ("30", 30.0), ("500ms", 0.5), ("10m", 600.0), ("1h30m", 5400.0),
    ("2d", 172800.0), (" 45s ", 45.0), ("1m30", 90.0),
])
def test_durations_are_read_in_human_units(text: int | float | str, seconds: float) -> None:
    """Durations accept plain seconds and s/ms/m/h/d units, also combined."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "m", "h1", True, None])
def test_bad_durations_are_refused(text: object) -> None:
    """Anything that is not a duration raises ValueError quoting the value."""
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, size", [
    (1024, 1024), ("512KiB", 512 * 1024), ("1MiB", 1024**2), ("2 MB", 2_000_000), ("10kb", 10_000),
    ("100", 100), ("64b", 64),
])
def test_sizes_are_read_in_binary_and_decimal_units(text: int | str, size: int) -> None:
    """Sizes accept bytes, KiB/MiB and kB/MB."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5GiB", "KiB"])
def test_bad_sizes_are_refused(text: str) -> None:
    """An unknown unit or a missing number raises ValueError quoting the value."""
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_relative_paths_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    """rules, packs, inventory and store paths are relative to the config file's folder."""
    path = _write(tmp_path, "rules: [../rules, extra.yaml]\npacks: [p]\ninventory: inv.yaml\n"
                            "store: {path: var/state.db}\n")
    cfg = load_config(path)
    base = path.parent
    assert cfg.rules == [tmp_path / "rules", base / "extra.yaml"]
    assert cfg.packs == [base / "p"]
    assert cfg.inventory == base / "inv.yaml"
    assert cfg.store.path == base / "var" / "state.db"
    assert cfg.source_file == path


def test_sources_are_a_discriminated_union_with_sizes(tmp_path: Path) -> None:
    """Each source is validated by its ``type``; max_payload accepts a size with units."""
    path = _write(tmp_path, """
sources:
  - {name: am, type: alertmanager, max_payload: 64KiB}
  - {name: k, type: kafka, topics: [alerts], dead_letter_topic: alerts.dlq}
  - {name: m, type: mqtt, topics: ["telemetry/+/cpu"]}
""")
    am, kafka, mqtt = load_config(path).sources
    assert isinstance(am, AlertmanagerSourceConfig) and am.max_payload == 64 * 1024
    assert isinstance(kafka, KafkaSourceConfig) and kafka.dead_letter_topic == "alerts.dlq"
    assert isinstance(mqtt, MqttSourceConfig) and mqtt.port == 1883


@pytest.mark.parametrize("text, line, message", [
    pytest.param("listen: 127.0.0.1:8080\ncolour: red\n", 2, "colour: unknown field",
                 id="unknown-field"),
    pytest.param("sources:\n  - {name: w, type: webhook}\n  - name: x\n    type: carrier-pigeon\n",
                 4, "sources[1].type: unknown source type 'carrier-pigeon' (expected one of "
                 "webhook, alertmanager, mqtt, kafka, sim, promql, scrape)",
                 id="unknown-source-type"),
    pytest.param("sinks:\n  - {name: s, type: redis}\n", 2,
                 "sinks[0].type: unknown sink type 'redis' (expected one of kafka, mqtt)",
                 id="unknown-sink-type"),
    pytest.param("sources:\n  - {name: x}\n", 2,
                 "sources[0].type: is required (one of webhook, alertmanager, mqtt, kafka, sim, "
                 "promql, scrape)",
                 id="missing-type"),
    pytest.param("sources:\n  - name: k\n    type: kafka\n", 2,
                 "sources[0].topics: is required", id="missing-required-field"),
    pytest.param("sources:\n  - name: k\n    type: kafka\n    topics: [a]\n"
                 "    commit_interval: soon\n", 5,
                 "sources[0].commit_interval: bad duration 'soon' (use e.g. 30s, 10m, 1h)",
                 id="bad-duration"),
    pytest.param("sources: [{name: a, type: webhook}, {name: a, type: alertmanager}]\n", None,
                 "duplicate source/sink name 'a'", id="duplicate-name"),
    pytest.param("sources:\n  - {name: w, type: webhook, max_payload: lots}\n", 2,
                 "sources[0].max_payload: bad size 'lots' (use bytes or KiB/MiB)",
                 id="bad-size"),
    pytest.param("sources:\n  - {name: w, type: webhook, max_payload: [1]}\n", 2,
                 "sources[0].max_payload: must be a size: bytes or a number with KiB/MiB/kB/MB",
                 id="size-of-wrong-type"),
    pytest.param("sources: [5]\n", 1, "sources[0]: must be a mapping", id="item-not-a-mapping"),
    pytest.param("sources: {a: 1}\n", 1, "sources: must be a list", id="not-a-list"),
    pytest.param("log: {format: json}\nengine:\n  queue_size: 0\n", 3,
                 "engine.queue_size: must be greater than or equal to 1", id="out-of-range"),
    pytest.param("engine: {queue_size: many}\n", 1, "engine.queue_size: must be an integer",
                 id="bad-type"),
    pytest.param("sources:\n  - {name: m, type: mqtt, topics: [a], port: 99999}\n", 2,
                 "sources[0].port: must be less than or equal to 65535", id="port-range"),
    pytest.param("listen: localhost\n", 1, "listen: must be HOST:PORT, got 'localhost'",
                 id="listen"),
    pytest.param("log: {level: chatty}\n", 1,
                 "log.level: must be 'debug', 'info', 'warning' or 'error'", id="literal"),
    pytest.param("guards:\n  maintenance:\n    - {from: '01:00', to: '02:00'}\n"
                 "    - {from: '25:00', to: '02:00'}\n", 4,
                 "guards.maintenance[1]: hour must be in 0..23", id="nested-list-item"),
    pytest.param("sources:\n  - name: s\n    type: sim\n    hosts: [a]\n    services: [b]\n"
                 "    faults:\n      - {at: 1s, host: a}\n", 7,
                 "sources[0].faults[0].service: is required", id="deep-missing-field"),
    pytest.param("store: {type: postgres}\n", 1,
                 "store: a postgres store needs dsn (e.g. dsn: env:LOOPD_PG_DSN)",
                 id="model-check"),
])
def test_invalid_config_names_file_line_and_field(
        tmp_path: Path, text: str, line: int | None, message: str) -> None:
    """A validation error is a ConfigError saying ``file:line: field: message`` in the
    file's own terms: keys and list indexes as written, no pydantic wording."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.origin == (str(path) if line is None else f"{path}:{line}")
    assert info.value.message == message
    for jargon in ("Value error", "Input should", "Input tag", "Field required", "Extra inputs"):
        assert jargon not in str(info.value)


def test_every_problem_is_reported_in_the_order_of_the_file(tmp_path: Path) -> None:
    """Several mistakes are reported together, one per line, each with its own line."""
    path = _write(tmp_path, "log: {level: chatty}\nengine:\n  queue_size: 0\ncolour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}:1: log.level: must be 'debug', 'info', 'warning' or 'error'",
        f"{path}:3: engine.queue_size: must be greater than or equal to 1",
        f"{path}:4: colour: unknown field",
    ]


@pytest.mark.parametrize("text, secret", [
    pytest.param("store:\n  type: postgres\n  dsn: postgresql://loopd:hunter2-SECRET@db/loopd\n",
                 "hunter2-SECRET", id="dsn-with-password"),
    pytest.param("api:\n  auth:\n    tokens:\n      - {name: a, role: boss, "
                 "token: LITERAL-SECRET-0123456789}\n", "LITERAL-SECRET", id="token-role"),
    pytest.param("api:\n  auth: {tokens: [{name: a, role: admin, token: [SECRET-IN-LIST]}]}\n",
                 "SECRET-IN-LIST", id="token-wrong-type"),
    pytest.param("sources:\n  - {name: m, type: mqtt, topics: [a], password_ref: 5, "
                 "username: [SECRET-USER]}\n", "SECRET-USER", id="mqtt-credentials"),
])
def test_config_errors_never_show_a_secret(tmp_path: Path, text: str, secret: str) -> None:
    """An invalid credential field is named, its value never shown."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert secret not in str(info.value)
    assert ": " in str(info.value)  # still names a place and a field


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    """A config that is not YAML fails with file:line."""
    path = _write(tmp_path, "listen: 127.0.0.1:8080\nsources: [\n  {name: a\nstore: {}\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path)
    assert info.value.origin is not None and info.value.origin.startswith(f"{path}:")


def test_config_must_be_a_mapping_and_must_exist(tmp_path: Path) -> None:
    """A list as config, or a missing file, is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.origin == str(tmp_path / "nope.yaml")


def test_an_empty_config_gives_the_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config: loopback API, SQLite store, rules/ and packs/."""
    path = _write(tmp_path, "")
    cfg = load_config(path)
    assert cfg.listen_host_port == ("127.0.0.1", 8080)
    assert cfg.rules == [path.parent / "rules"]
    assert cfg.sources == []


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOPD_* variables override listen, store, log and every kafka/mqtt source."""
    path = _write(tmp_path, """
listen: 127.0.0.1:8080
sources:
  - {name: k1, type: kafka, topics: [a], bootstrap: "10.0.0.1:9092"}
  - {name: k2, type: kafka, topics: [b]}
  - {name: m, type: mqtt, topics: [c], host: broker}
""")
    monkeypatch.setenv("LOOPD_LISTEN", "0.0.0.0:9999")
    monkeypatch.setenv("LOOPD_STORE_PATH", "/srv/loopd/state.db")
    monkeypatch.setenv("LOOPD_LOG_FORMAT", "json")
    monkeypatch.setenv("LOOPD_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    monkeypatch.setenv("LOOPD_MQTT_HOST", "127.0.0.2")
    monkeypatch.setenv("LOOPD_MQTT_PORT", "18830")
    cfg = load_config(path)
    assert cfg.listen_host_port == ("0.0.0.0", 9999)
    assert cfg.store.path == Path("/srv/loopd/state.db")
    assert cfg.log.format == "json"
    k1, k2, m = cfg.sources
    assert isinstance(k1, KafkaSourceConfig) and isinstance(k2, KafkaSourceConfig)
    assert k1.bootstrap == k2.bootstrap == "127.0.0.1:19092"
    assert isinstance(m, MqttSourceConfig) and (m.host, m.port) == ("127.0.0.2", 18830)


@pytest.mark.parametrize("var, value, message", [
    ("LOOPD_MQTT_PORT", "not-a-port", "sources[1].port: must be an integer"),
    ("LOOPD_LOG_LEVEL", "loud", "log.level: must be 'debug', 'info', 'warning' or 'error'"),
    ("LOOPD_LISTEN", "nowhere", "listen: must be HOST:PORT, got 'nowhere'"),
    ("LOOPD_LOG_FORMAT", "xml", "log.format: must be 'console' or 'json'"),
])
def test_bad_environment_overrides_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str,
) -> None:
    """A bad LOOPD_* value is reported like a bad field, with the variable in place of a
    line of the file, never as a crash."""
    path = _write(tmp_path, "listen: 127.0.0.1:8080\nsources:\n  - {name: w, type: webhook}\n"
                            "  - {name: m, type: mqtt, topics: [c]}\nstore: {path: x.db}\n"
                            "log: {level: info}\n")
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"environment variable {var}: {message}"


def test_listen_argument_wins(tmp_path: Path) -> None:
    """``load_config(listen=...)`` (the CLI's ``--listen``) overrides the file."""
    cfg = load_config(_write(tmp_path, "listen: 127.0.0.1:8080\n"), listen="127.0.0.1:0")
    assert cfg.listen_host_port == ("127.0.0.1", 0)


def test_a_bad_listen_argument_names_the_flag(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad ``--listen`` is reported as the flag's, not as the file's or LOOPD_LISTEN's,
    and another problem in the file keeps its line."""
    monkeypatch.setenv("LOOPD_LISTEN", "127.0.0.1:9000")
    path = _write(tmp_path, "listen: 127.0.0.1:8080\nlog: {level: chatty}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, listen="no-port")
    assert str(info.value).splitlines() == [
        "--listen: listen: must be HOST:PORT, got 'no-port'",
        f"{path}:2: log.level: must be 'debug', 'info', 'warning' or 'error'",
    ]


def test_the_shipped_config_loads() -> None:
    """config/loopd.yaml is valid and points at the shipped rules and packs."""
    cfg = load_config(REPO / "config" / "loopd.yaml")
    assert {s.name for s in cfg.sources} == {"webhook", "alertmanager"}
    assert cfg.rules == [REPO / "rules"]
    assert cfg.packs == [REPO / "packs"]


# -- api.auth: tokens by reference ---------------------------------------------------------

def _auth_config(tmp_path: Path, tokens: list[dict[str, str]]) -> Path:
    import yaml

    return _write(tmp_path, yaml.safe_dump({"api": {"auth": {"tokens": tokens}}}))


def _tokens_of(path: Path) -> object:
    import asyncio

    from loopd.api.auth import Tokens
    from loopd.catalog.backends import SecretResolver
    from loopd.config import AuthConfig

    auth = load_config(path).api.auth
    assert isinstance(auth, AuthConfig)
    return asyncio.run(Tokens.resolve(auth, SecretResolver()))


def test_api_tokens_resolve_from_env_and_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens given as env: and file: references resolve; the compiled tokens keep no value."""
    monkeypatch.setenv("LOOPD_TEST_TOKEN", "env-token-0123456789abcdef")
    secret = tmp_path / "am-token"
    secret.write_text("file-token-0123456789abcdef\n")
    tokens = _tokens_of(_auth_config(tmp_path, [
        {"name": "ci", "role": "admin", "token": "env:LOOPD_TEST_TOKEN"},
        {"name": "alertmanager", "role": "ingest", "token": f"file:{secret}"}]))
    from loopd.api.auth import Tokens

    assert isinstance(tokens, Tokens)
    found = tokens.match("file-token-0123456789abcdef")
    assert found is not None and (found.name, found.role.label) == ("alertmanager", "ingest")
    assert tokens.match("file-token-0123456789abcde") is None
    assert "0123456789" not in repr(tokens._tokens)


@pytest.mark.parametrize("tokens, message", [
    pytest.param([{"name": "am", "role": "ingest", "token": "LITERAL-secret-value-123456"}],
                 "api.auth token 'am': not a reference (use env:VAR, file:/path, dir:KEY or "
                 "exec:COMMAND); the value is not shown", id="literal-value"),
    pytest.param([{"name": "am", "role": "ingest", "token": "ab:LITERAL-secret-value-1234"}],
                 "api.auth token 'am': not a reference (use env:VAR, file:/path, dir:KEY or "
                 "exec:COMMAND); the value is not shown", id="unknown-scheme"),
    pytest.param([{"name": "am", "role": "ingest", "token": "env:LOOPD_TEST_UNSET"}],
                 "api.auth token 'am': environment variable LOOPD_TEST_UNSET is not set",
                 id="unset-env"),
    pytest.param([{"name": "am", "role": "ingest", "token": "env:LOOPD_TEST_SHORT"}],
                 "api.auth token 'am': token is shorter than 16 characters", id="short"),
    pytest.param([{"name": "a", "role": "ingest", "token": "env:LOOPD_TEST_TOKEN"},
                  {"name": "b", "role": "admin", "token": "env:LOOPD_TEST_TOKEN"}],
                 "api.auth token 'b': token has the same value as token 'a'", id="same-value"),
])
def test_a_bad_api_token_is_a_config_error_naming_the_token_never_the_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: list[dict[str, str]],
        message: str) -> None:
    """A literal, unknown-scheme, unset, short or repeated token fails with an error that
    names the token and never contains its value."""
    monkeypatch.setenv("LOOPD_TEST_TOKEN", "same-token-0123456789abcdef")
    monkeypatch.setenv("LOOPD_TEST_SHORT", "tooshort-SECRET")
    monkeypatch.delenv("LOOPD_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        _tokens_of(_auth_config(tmp_path, tokens))
    assert str(err.value) == message
    for value in ("LITERAL-secret", "same-token-0123", "tooshort-SECRET"):
        assert value not in str(err.value)


@pytest.mark.parametrize("api, message", [
    ({"auth": {"tokens": [{"name": "a", "role": "boss", "token": "env:X"}]}},
     "api.auth.tokens[0].role: must be 'viewer', 'ingest', 'operator' or 'admin'"),
    ({"auth": {"tokens": [{"name": "a", "role": "admin", "token": "env:X"},
                          {"name": "a", "role": "viewer", "token": "env:Y"}]}},
     "api.auth.tokens: duplicate token name 'a'"),
    ({"auth": {"tokens": []}}, "api.auth.tokens: must not be empty"),
    ({"auth": "off"}, "api.auth: must be a mapping with tokens: [...], or the word none"),
    ({"auth": 5}, "api.auth: must be a mapping or 'none'"),
    ({"tls": {"cert": "c.pem"}}, "api.tls.key: is required"),
])
def test_api_auth_and_tls_config_errors_name_the_field(
        tmp_path: Path, api: dict[str, object], message: str) -> None:
    """Unknown roles, repeated token names, no tokens, a misspelt ``none`` and a TLS
    section without a key are rejected naming the field."""
    import yaml

    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, yaml.safe_dump({"api": api})))
    assert str(err.value).endswith(message)


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """``api.tls`` file paths resolve against loopd.yaml's directory."""
    path = _write(tmp_path, "api: {tls: {cert: tls/c.pem, key: tls/k.pem, client_ca: ca.pem}}")
    tls = load_config(path).api.tls
    assert tls is not None
    assert (tls.cert, tls.key, tls.client_ca) == (
        path.parent / "tls/c.pem", path.parent / "tls/k.pem", path.parent / "ca.pem")


def test_loopd_check_reports_what_would_stop_the_api(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``loopd check`` reports an unauthenticated non-loopback listen, a bad token and an
    unreadable certificate, each naming its place and no secret value."""
    from loopd.cli import EXIT_INVALID, check

    path = _write(tmp_path, "listen: 0.0.0.0:8080\nrules: []\npacks: []\n"
                            "api: {tls: {cert: nope.crt, key: nope.key}}\n")
    assert check(path) == EXIT_INVALID
    out = capsys.readouterr().out
    assert "refusing to listen on 0.0.0.0:8080 without authentication" in out
    assert "api.tls: cannot load certificate" in out and "nope.crt" in out
    path = _write(tmp_path, "rules: []\npacks: []\napi: {auth: {tokens: [{name: am, "
                            "role: ingest, token: LITERAL-token-value-0123}]}}\n")
    assert check(path) == EXIT_INVALID
    out = capsys.readouterr().out
    assert "api.auth token 'am': not a reference (use env:VAR" in out
    assert "LITERAL-token" not in out


async def test_api_tokens_resolve_through_every_secret_backend(tmp_path: Path) -> None:
    """A token may be a dir: key (a mounted Kubernetes secret) or an exec: helper's output,
    like any other reference."""
    import sys

    import yaml

    from loopd.api.auth import Tokens
    from loopd.catalog.backends import SecretResolver
    from loopd.config import AuthConfig

    (tmp_path / "mounted").mkdir()
    (tmp_path / "mounted" / "am-token").write_text("dir-token-0123456789abcdef\n")
    helper = f"exec:{sys.executable} -c \"print('exec-token-0123456789abcdef')\""
    path = _write(tmp_path, yaml.safe_dump({"api": {"auth": {"tokens": [
        {"name": "am", "role": "ingest", "token": "dir:am-token"},
        {"name": "ci", "role": "admin", "token": helper}]}}}))
    auth = load_config(path).api.auth
    assert isinstance(auth, AuthConfig)
    tokens = await Tokens.resolve(auth, SecretResolver(dir=tmp_path / "mounted"))
    found = [tokens.match(v) for v in ("dir-token-0123456789abcdef",
                                       "exec-token-0123456789abcdef")]
    assert [(t.name, t.role.label) for t in found if t] == [("am", "ingest"), ("ci", "admin")]
