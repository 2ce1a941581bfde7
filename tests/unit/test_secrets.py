"""The one redaction module: by key name in a tree, by known value in texts and trees."""

from __future__ import annotations

from loopd.catalog.secrets import MASK, Secrets, redact_keys

TOKEN = "tok-0123456789abcdef"
HOOK = "https://hooks.example.com/services/T0/B1/XyZ987654321"


def test_values_under_secret_looking_keys_are_masked_at_any_depth() -> None:
    """Every value under a password/token/authorization-like key becomes ``***``."""
    tree = {"user": "ops", "Password": "pw-1", "nested": [{"api_key": "k-1", "x": 1}],
            "headers": {"Authorization": f"Bearer {TOKEN}"}, "hook": HOOK}
    shown = redact_keys(tree, also={"hook"})
    assert shown == {"user": "ops", "Password": MASK, "nested": [{"api_key": MASK, "x": 1}],
                     "headers": {"Authorization": MASK}, "hook": MASK}
    assert tree["Password"] == "pw-1"  # a copy, the original is untouched


def test_known_values_are_masked_in_text_and_trees() -> None:
    """A known secret is masked wherever it occurs; a URL secret keeps only its origin."""
    secrets = Secrets([TOKEN, HOOK, None, 42, "ab"])
    text = f"401 bad token: Bearer {TOKEN}; posted to {HOOK}; path /services/T0/B1/XyZ987654321"
    shown = secrets.text(text)
    assert TOKEN not in shown and "XyZ987654321" not in shown
    assert "Bearer ***" in shown and "https://hooks.example.com/***" in shown
    tree = secrets.tree({"json": {"echo": [TOKEN]}, "status": 200, TOKEN[:2]: "ab"})
    assert tree == {"json": {"echo": [MASK]}, "status": 200, "to": "ab"}
    assert TOKEN not in repr(secrets)


def test_short_values_and_no_values_change_nothing() -> None:
    """Values under four characters are not secrets worth masking, and no secrets is a no-op."""
    assert Secrets(["abc"]).text("abc abc") == "abc abc"
    assert not Secrets()
    assert Secrets().tree({"a": ["b"]}) == {"a": ["b"]}
