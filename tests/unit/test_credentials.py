"""Credentials: one type from the inventory file to the runner, references until used,
and no value in any error, even a malformed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopd.catalog.credentials import Credentials, Reference, parse_reference, resolve_secret
from loopd.catalog.inventory import Inventory
from loopd.cli import main
from loopd.errors import ActionError, ConfigError
from loopd.packs.executor import ActionContext

SECRET = "s3cret-value-0123456789"
LITERAL = "LITERALPW-1234abcd"
UNKNOWN = "vault2:UNKNOWNSCHEME-5678efgh"


def test_inventory_file_gives_credentials_holding_references(tmp_path: Path) -> None:
    """Loading an inventory keeps each credential as its references, whose text shows no secret."""
    path = tmp_path / "inventory.yaml"
    path.write_text("credentials:\n  svc: {username: loopd, password: 'env:CRED_TEST_PW'}\n")
    creds = Inventory.load(path).credentials["svc"]
    assert isinstance(creds, Credentials)
    assert creds.password == "env:CRED_TEST_PW"
    assert SECRET not in repr(creds) + str(creds) + creds.model_dump_json()


async def test_a_reference_is_resolved_when_used_not_when_loaded(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A secret set (or rotated) after the inventory was loaded is what ``secret()`` returns."""
    key = tmp_path / "key"
    creds = Credentials(username="env:CRED_TEST_USER", password="env:CRED_TEST_PW",
                        key=f"file:{key}")
    ctx = ActionContext("run-1", "task", Inventory(credentials={"svc": creds}))
    monkeypatch.setenv("CRED_TEST_PW", SECRET)
    monkeypatch.setenv("CRED_TEST_USER", "ops")
    key.write_text("KEY-1\n")
    assert (await ctx.secret("svc", "username"), await ctx.secret("svc", "password"),
            await ctx.secret("svc", "key"), await ctx.secret("svc", "token")
            ) == ("ops", SECRET, "KEY-1", None)
    key.write_text("KEY-2\n")
    assert await ctx.secret("svc", "key") == "KEY-2"
    assert Credentials(username="plain").reference("username") == "plain"


async def test_an_unresolvable_reference_names_the_reference_not_a_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing variable fails the action with the credentials' name, field and reference."""
    monkeypatch.delenv("CRED_TEST_MISSING", raising=False)
    ctx = ActionContext("run-1", "task", Inventory(credentials={
        "svc": Credentials(password="env:CRED_TEST_MISSING")}))
    with pytest.raises(ActionError, match=r"^credentials 'svc' password: env:CRED_TEST_MISSING: "
                                          "environment variable CRED_TEST_MISSING is not set$"):
        await ctx.secret("svc", "password")
    with pytest.raises(ActionError, match="unknown credentials 'other'"):
        await ctx.secret("other", "password")


@pytest.mark.parametrize("value", [LITERAL, UNKNOWN, "env:" + LITERAL + " x", "file:" + LITERAL,
                                   "dir:../" + LITERAL, "exec:'" + LITERAL])
async def test_a_malformed_reference_is_never_echoed(value: str) -> None:
    """A literal value, an unknown scheme or a malformed target fails with the entry and
    field named and the value (or any part of it) not shown."""
    ctx = ActionContext("run-1", "task", Inventory(credentials={
        "ssh-literal": Credentials(username="ops", password=value)}))
    with pytest.raises(ActionError) as caught:
        await ctx.secret("ssh-literal", "password")
    message = str(caught.value)
    assert message.startswith("credentials 'ssh-literal' password: ")
    assert message.endswith("the value is not shown")
    assert LITERAL not in message and "UNKNOWNSCHEME" not in message and "vault2" not in message
    with pytest.raises(ConfigError) as raised:
        resolve_secret(value)  # the broker passwords' path says the same
    assert LITERAL not in str(raised.value) and "vault2" not in str(raised.value)


def test_the_literal_message_says_what_to_use_instead() -> None:
    """A value that is no reference at all gets the list of schemes to use."""
    with pytest.raises(ConfigError, match=r"^not a reference \(use env:VAR, file:/path, "
                                          r"dir:KEY or exec:COMMAND\); the value is not shown$"):
        parse_reference(LITERAL)
    assert parse_reference("exec:vault kv get -field=pw 'secret/db'").argv == [
        "vault", "kv", "get", "-field=pw", "secret/db"]
    assert parse_reference("dir:db/password") == Reference("dir", "db/password")


def test_inventory_read_locates_a_malformed_reference_without_its_value(tmp_path: Path) -> None:
    """``read`` reports each malformed credential field at its file:line, naming entry and
    field; ``load`` (the daemon) keeps the other entries usable."""
    path = tmp_path / "inventory.yaml"
    path.write_text(f"""\
credentials:
  good: {{password: 'env:CRED_OK'}}
  ssh-literal:
    username: ops
    password: {LITERAL}
  odd: {{token: '{UNKNOWN}'}}
""")
    _, errors = Inventory.read(path)
    assert [str(e) for e in errors] == [
        f"{path}:5: credentials.ssh-literal.password: not a reference (use env:VAR, "
        "file:/path, dir:KEY or exec:COMMAND); the value is not shown",
        f"{path}:6: credentials.odd.token: not a reference (use env:VAR, file:/path, "
        "dir:KEY or exec:COMMAND); the value is not shown",
    ]
    assert Inventory.load(path).credentials["good"].password == "env:CRED_OK"


def test_loopd_check_reports_a_literal_credential_without_its_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``loopd check`` fails on a literal password with a located error, not the password."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "packs").mkdir()
    (tmp_path / "inventory.yaml").write_text(
        f"credentials:\n  ssh-literal: {{username: ops, password: {LITERAL}}}\n")
    (tmp_path / "loopd.yaml").write_text("inventory: inventory.yaml\nrules: [rules]\n"
                                         "packs: [packs]\n")
    assert main(["check", "-c", str(tmp_path / "loopd.yaml")]) == 1
    out = capsys.readouterr()
    assert "inventory.yaml:2: credentials.ssh-literal.password: not a reference" in out.out
    assert LITERAL not in out.out + out.err


def test_unknown_fields_are_refused() -> None:
    """An inventory credential with a field loopd does not know is a validation error."""
    with pytest.raises(ValueError, match="passwd"):
        Credentials.model_validate({"passwd": "env:X"})
