"""Secret backends: env, file, a mounted secret directory and exec helpers, the TTL cache,
and errors that name the reference but never a value or a helper's stderr verbatim."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from loopd.catalog.backends import MAX_STDERR_LINE, SecretResolver, sanitized_line
from loopd.config import SecretsConfig
from loopd.errors import ConfigError
from tests.servers import wait_until

VALUE = "Backend-Secret-7f3a9c1e2b"


def helper(tmp_path: Path, body: str) -> str:
    """An ``exec:`` reference to a Python helper script; each run appends to ``runs``."""
    script = tmp_path / "helper.py"
    script.write_text("import sys, time\n"
                      f"open({str(tmp_path / 'runs')!r}, 'a').write('x')\n" + body)
    return "exec:" + shlex.join([sys.executable, str(script)])


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text()) if path.exists() else 0


async def test_env_is_read_at_each_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """``env:VAR`` is the variable's value now; with the default ttl 0 a change shows at once."""
    resolver = SecretResolver()
    monkeypatch.setenv("BACKEND_TEST", VALUE)
    assert await resolver.resolve("env:BACKEND_TEST") == VALUE
    monkeypatch.setenv("BACKEND_TEST", "rotated-0123")
    assert await resolver.resolve("env:BACKEND_TEST") == "rotated-0123"


async def test_file_drops_the_trailing_newline_and_names_a_missing_file(tmp_path: Path) -> None:
    """``file:/path`` is the file's text without its newline; a missing file is named."""
    (tmp_path / "pw").write_text(VALUE + "\n")
    resolver = SecretResolver()
    assert await resolver.resolve(f"file:{tmp_path / 'pw'}") == VALUE
    with pytest.raises(ConfigError, match=rf"^file:{tmp_path}/nope: cannot read secret file: "
                                          "No such file or directory$"):
        await resolver.resolve(f"file:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"absolute path.*the value is not shown"):
        await resolver.resolve("file:relative/pw")


async def test_dir_reads_a_key_of_the_mounted_secret(tmp_path: Path) -> None:
    """``dir:KEY`` reads ``secrets.dir/KEY``, through Kubernetes' ``..data`` symlinks."""
    mount = tmp_path / "mount"
    (mount / "..2026_12_01").mkdir(parents=True)
    (mount / "..2026_12_01" / "db-password").write_text(VALUE)
    (mount / "..data").symlink_to("..2026_12_01")
    (mount / "db-password").symlink_to("..data/db-password")
    assert await SecretResolver(dir=mount).resolve("dir:db-password") == VALUE
    with pytest.raises(ConfigError, match=r"^dir:db-password: dir: references need secrets.dir"):
        await SecretResolver().resolve("dir:db-password")


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "a/../../outside", ".hidden",
                                 "a//b", ""])
async def test_dir_refuses_keys_that_leave_the_directory(tmp_path: Path, key: str) -> None:
    """A ``dir:`` key with ``..``, an absolute path or a hidden name is malformed, not read."""
    (tmp_path / "outside").write_text(VALUE)
    with pytest.raises(ConfigError, match=r"^malformed dir: reference: .*the value is not shown"):
        await SecretResolver(dir=tmp_path / "mount").resolve(f"dir:{key}")


async def test_dir_refuses_a_symlink_out_of_the_directory(tmp_path: Path) -> None:
    """A key that is a symlink to a file outside ``secrets.dir`` is refused, not read."""
    (tmp_path / "outside").write_text(VALUE)
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(ConfigError, match=r"^dir:escape: the key leads outside secrets\.dir$"):
        await SecretResolver(dir=tmp_path / "mount").resolve("dir:escape")


async def test_exec_stdout_is_the_value_and_is_cached_for_exec_ttl(tmp_path: Path) -> None:
    """A helper's stdout (without newline) is the value; within ``exec_ttl`` it is not run
    again, and concurrent uses share one run."""
    ref = helper(tmp_path, f"print({VALUE!r})\n")
    resolver = SecretResolver(exec_ttl=300)
    values = await asyncio.gather(*(resolver.resolve(ref) for _ in range(5)))
    assert values == [VALUE] * 5
    assert await resolver.resolve(ref) == VALUE
    assert runs(tmp_path) == 1
    assert VALUE not in repr(resolver)


async def test_exec_ttl_zero_runs_the_helper_at_each_use(tmp_path: Path) -> None:
    """With ``exec_ttl: 0`` the helper is asked every time."""
    ref = helper(tmp_path, f"print({VALUE!r})\n")
    resolver = SecretResolver(exec_ttl=0)
    for _ in range(3):
        assert await resolver.resolve(ref) == VALUE
    assert runs(tmp_path) == 3


async def test_a_failing_helper_shows_its_status_and_no_secret_from_stderr(
        tmp_path: Path) -> None:
    """A non-zero exit gives the status and a sanitized first stderr line: the secret it
    printed there (and its stdout) is shown as ``***``; a failure is not cached."""
    ref = helper(tmp_path, f"print({VALUE!r})\n"
                           f"sys.stderr.write('Error: permission denied for {VALUE}\\n"
                           f"second line {VALUE}\\n')\nsys.exit(3)\n")
    resolver = SecretResolver()
    with pytest.raises(ConfigError) as caught:
        await resolver.resolve(ref)
    assert caught.value.message == "the helper exited 3: Error: permission denied for ***"
    assert VALUE not in str(caught.value)
    with pytest.raises(ConfigError):
        await resolver.resolve(ref)
    assert runs(tmp_path) == 2


async def test_a_helper_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    """A helper that does not answer within ``exec_timeout`` is killed (its whole process
    group) and the use fails with the timeout named."""
    pid_file = tmp_path / "pid"
    ref = helper(tmp_path, f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                           "time.sleep(60)\n")
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"the helper did not answer within 0.5s$"):
        await SecretResolver(exec_timeout=0.5).resolve(ref)
    assert time.monotonic() - began < 5
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


async def test_a_child_the_helper_left_holding_its_pipes_is_killed_too(tmp_path: Path
                                                                        ) -> None:
    """A helper that exits at once but leaves a child holding its output open times out,
    and that child is killed with it: nothing of a helper outlives its use."""
    pid_file = tmp_path / "pid"
    ref = helper(tmp_path, "import subprocess, sys\n"
                           "child = subprocess.Popen([sys.executable, '-c', "
                           "'import time; time.sleep(60)'])\n"
                           f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                           "print('value')\n")
    with pytest.raises(ConfigError, match=r"the helper did not answer within 0.5s$"):
        await SecretResolver(exec_timeout=0.5).resolve(ref)
    child = int(pid_file.read_text())

    def gone() -> bool:  # killed: no such process, or a zombie until init reaps it
        try:
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    await wait_until(gone, what="the helper's child killed", timeout=5)


async def test_a_helper_that_prints_nothing_or_does_not_exist_fails_clearly(
        tmp_path: Path) -> None:
    """An empty answer and a missing program are errors that name the reference."""
    ref = helper(tmp_path, "pass\n")
    with pytest.raises(ConfigError, match=r"the helper printed nothing$"):
        await SecretResolver().resolve(ref)
    with pytest.raises(ConfigError, match=r"^exec:/nonexistent/vault read x: cannot run the "
                                          "helper: No such file or directory$"):
        await SecretResolver().resolve("exec:/nonexistent/vault read x")


async def test_the_cache_is_bounded_and_ttl_applies_to_env_and_files(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a ttl, env values are kept until it ends; never more than ``max_cached``."""
    resolver = SecretResolver(ttl=300, max_cached=2)
    for i in range(4):
        monkeypatch.setenv(f"BACKEND_{i}", f"value-{i}-0123")
        await resolver.resolve(f"env:BACKEND_{i}")
    assert repr(resolver) == "SecretResolver(2 cached)"
    monkeypatch.setenv("BACKEND_3", "changed-0123")
    assert await resolver.resolve("env:BACKEND_3") == "value-3-0123"  # cached
    resolver.forget()
    assert await resolver.resolve("env:BACKEND_3") == "changed-0123"


def test_sanitized_line_keeps_prose_and_hides_tokens() -> None:
    """Only prose-like words of the first non-empty stderr line survive, within a bound."""
    assert sanitized_line(b"\n  Code: 403. Errors:\n* permission denied\n") == \
        "Code: 403. Errors:"
    assert sanitized_line(b"token hvs.CAESIJ0abc expired at /v1/secret/db") == \
        "token *** expired at ***"
    assert len(sanitized_line(b"word " * 200)) == MAX_STDERR_LINE
    assert sanitized_line(b"") == ""


def test_secrets_config_refuses_a_relative_dir() -> None:
    """``secrets.dir`` must be absolute: a mounted volume is not relative to the config."""
    assert SecretsConfig().exec_ttl == 300 and SecretsConfig().ttl == 0
    with pytest.raises(ValueError, match=r"secrets\.dir must be an absolute path"):
        SecretsConfig.model_validate({"dir": "var/secrets"})
