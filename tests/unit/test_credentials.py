"""Credentials: one type from the inventory file to the runner, references until used."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.errors import ActionError, ConfigError
from loopd.packs.executor import ActionContext

SECRET = "s3cret-value-0123456789"


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
    assert Credentials(username="plain").resolve("username") == "plain"


async def test_an_unresolvable_reference_names_the_reference_not_a_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing variable fails the action with the credentials' name and reference only."""
    monkeypatch.delenv("CRED_TEST_MISSING", raising=False)
    ctx = ActionContext("run-1", "task", Inventory(credentials={
        "svc": Credentials(password="env:CRED_TEST_MISSING")}))
    with pytest.raises(ActionError, match=r"credentials 'svc': .*CRED_TEST_MISSING"):
        await ctx.secret("svc", "password")
    with pytest.raises(ActionError, match="unknown credentials 'other'"):
        await ctx.secret("other", "password")
    with pytest.raises(ConfigError, match="unknown credential scheme"):
        Credentials(token="vault:x").resolve("token")


def test_unknown_fields_are_refused() -> None:
    """An inventory credential with a field loopd does not know is a validation error."""
    with pytest.raises(ValueError, match="passwd"):
        Credentials.model_validate({"passwd": "env:X"})
