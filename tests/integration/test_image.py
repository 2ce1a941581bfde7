"""The container image, proven without a container runtime (none is reachable here).

The test reads the top-level ``Dockerfile`` and ``.dockerignore``, copies exactly what
the ``COPY`` instructions take from the build context into an empty directory (the
builder stage's tree and the runtime stage's root filesystem), builds the wheel from the
builder's tree, installs it with the ``fast`` extra into a fresh venv, and runs that
venv's ``loopd check`` and ``loopd run`` on the image's default config, with container
paths mapped to the temporary directory: the root filesystem, the one ``VOLUME`` and the
mounted token files. After the run only the volume has changed (a read-only root works).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.servers import free_port, require, wait_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TOKENS = {"ingest": "ingest-token-0123456789abcdef", "admin": "admin-token-0123456789abcdef"}


# --- reading the Dockerfile -------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions per stage: comment lines dropped, continuation lines joined."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comments (and parser directives), also inside a continuation
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        inst = Instruction(keyword.upper(), rest.strip())
        if inst.keyword == "FROM":
            words = inst.args.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append(inst)
        elif inst.keyword == "ARG":
            key, _, default = inst.args.partition("=")
            args[key] = default
    return Dockerfile(args, stages)


def arg_defaults(stage: Stage) -> dict[str, str]:
    out = {}
    for inst in stage.all("ARG"):
        key, _, default = inst.args.partition("=")
        out[key] = default
    return out


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def key_values(args: str) -> dict[str, str]:
    """``LABEL`` / ``ENV`` in the ``key=value key2="value 2"`` form."""
    pairs = [word.partition("=") for word in shlex.split(args)]
    assert all(sep for _, sep, _ in pairs), f"use key=value: {args}"
    return {k: v for k, _, v in pairs}


@dataclass
class Copy:
    sources: list[str]
    dest: str
    workdir: str


def context_copies(stage: Stage) -> list[Copy]:
    """The stage's COPY/ADD instructions that read the build context (not --from)."""
    copies = []
    workdir = "/"
    for inst in stage.instructions:
        if inst.keyword == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / inst.args)
        if inst.keyword not in ("COPY", "ADD"):
            continue
        assert inst.keyword == "COPY", "ADD fetches and unpacks: the image uses COPY only"
        words = exec_form(inst.args) if inst.args.startswith("[") else shlex.split(inst.args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        copies.append(Copy(paths[:-1], paths[-1], workdir))
    return copies


# --- the build context ------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def context_files(source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """Files of the build context that ``COPY source`` sends (paths relative to ROOT)."""
    base = ROOT / source
    assert base.exists(), f"COPY {source}: not in the repository"
    assert not excluded(source, rules) or base.is_dir(), f"COPY {source}: .dockerignore'd"
    if base.is_file():
        return [source]
    files = sorted(str(p.relative_to(ROOT)) for p in base.rglob("*") if p.is_file())
    sent = [f for f in files if not excluded(f, rules)]
    assert sent, f"COPY {source}: .dockerignore leaves nothing of it"
    return sent


def copy_stage(stage: Stage, target: Path, rules: list[tuple[bool, re.Pattern[str]]]
               ) -> list[tuple[str, str]]:
    """Materialise the stage's context COPYs under ``target`` (its root); returns
    (context source, container destination) pairs."""
    done = []
    for cp in context_copies(stage):
        dest = PurePosixPath(cp.workdir) / cp.dest
        into_dir = cp.dest.endswith("/") or len(cp.sources) > 1
        for source in cp.sources:
            src = ROOT / source
            for rel in context_files(source, rules):
                if src.is_dir():  # a folder's contents go into dest
                    to = dest / Path(rel).relative_to(source).as_posix()
                else:
                    to = dest / src.name if into_dir else dest
                host = target / str(to).lstrip("/")
                host.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, host)
            done.append((source, str(dest)))
    return done


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root with a digest of its content and mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = f"dir {path.stat().st_mode:o}"
        else:
            out[rel] = f"{path.stat().st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return out


# --- tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def pyproject_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


def test_dockerfile_is_multi_stage_slim_non_root_and_labelled(dockerfile: Dockerfile) -> None:
    """The Dockerfile builds in one stage and runs from a slim Python 3.11+ base as a
    fixed non-root uid, labelled with pyproject's version, with ``loopd run`` as entrypoint."""
    assert len(dockerfile.stages) >= 2, "multi-stage: a builder and a runtime stage"
    for stage in dockerfile.stages:
        base = expand(stage.base, dockerfile.args)
        assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", base), base
    runtime = dockerfile.runtime
    variables = dockerfile.args | arg_defaults(runtime)
    labels = {k: expand(v, variables) for inst in runtime.all("LABEL")
              for k, v in key_values(inst.args).items()}
    assert labels["org.opencontainers.image.version"] == pyproject_version()
    assert labels["org.opencontainers.image.title"] == "loopd"
    assert {"org.opencontainers.image.description", "org.opencontainers.image.licenses"} \
        <= labels.keys()
    user = runtime.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}: a numeric gid"
    assert exec_form(runtime.last("ENTRYPOINT").args) == ["loopd", "run"]
    cmd = exec_form(runtime.last("CMD").args)
    assert cmd[0] == "-c" and len(cmd) == 2, cmd
    builder_runs = " ".join(i.args for s in dockerfile.stages[:-1] for i in s.all("RUN"))
    assert "pip wheel" in builder_runs and ".[fast]" in builder_runs
    assert "loopd[fast]" in " ".join(i.args for i in runtime.all("RUN"))
    assert all(i.args.strip() for i in runtime.all("VOLUME"))


def test_dockerignore_keeps_local_state_out(dockerfile: Dockerfile) -> None:
    """The build context sends the COPYed sources and never the venv, git, tests or caches."""
    rules = dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "var/loopd.db",
                 "loopd/__pycache__/cli.cpython-311.pyc", "packs/core/__pycache__/a.pyc",
                 "config/loopd.yaml", "benchmarks/x.py", "loopd.egg-info/PKG-INFO"):
        assert excluded(path, rules), path
    for stage in dockerfile.stages:
        for cp in context_copies(stage):
            for source in cp.sources:
                assert context_files(source, rules)  # sent, not ignored


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)
    assert done.returncode == 0, f"{shlex.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done


@dataclass
class Image:
    """The image's file system laid out under one temporary directory."""

    rootfs: Path  # the image's root file system (read-only at run time)
    volume: Path  # the VOLUME (the only writable path)
    volume_at: PurePosixPath
    secrets: Path  # the token files, mounted read-only from a secret
    secrets_at: PurePosixPath
    venv: Path  # the image's Python environment (the runtime stage's pip install)
    env: dict[str, str]
    config_at: PurePosixPath
    workdir: Path

    def host(self, container: PurePosixPath) -> Path:
        for at, host in ((self.volume_at, self.volume), (self.secrets_at, self.secrets)):
            if container.is_relative_to(at):
                return host / container.relative_to(at)
        return self.rootfs / str(container).lstrip("/")


@pytest.fixture(scope="module")
def image(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Image:
    require(importlib.util.find_spec("ensurepip") is not None, "python -m venv (ensurepip)")
    tmp = tmp_path_factory.mktemp("image")
    rules = dockerignore()
    builder, runtime = dockerfile.stages[0], dockerfile.runtime
    copy_stage(builder, tmp / "builder", rules)
    src = tmp / "builder" / str(PurePosixPath(builder.last("WORKDIR").args)).lstrip("/")
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
          str(src)])
    wheel = next(wheels.glob("loopd-*.whl"))
    assert wheel.name.startswith(f"loopd-{pyproject_version()}-")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[fast]"])
    rootfs = tmp / "rootfs"
    copy_stage(runtime, rootfs, rules)
    (volume_at,) = [PurePosixPath(v) for i in runtime.all("VOLUME") for v in exec_form(i.args)]
    volume = tmp / "volume"
    volume.mkdir()
    secrets_at = PurePosixPath("/etc/loopd/tokens")
    secrets = tmp / "secrets"
    secrets.mkdir()
    for name, token in TOKENS.items():
        (secrets / name).write_text(token + "\n")
    variables = dockerfile.args | arg_defaults(runtime)
    env = {k: expand(v, variables) for i in runtime.all("ENV")
           for k, v in key_values(i.args).items()}
    config_at = PurePosixPath(exec_form(runtime.last("CMD").args)[1])
    workdir = PurePosixPath(runtime.last("WORKDIR").args)
    made = Image(rootfs, volume, volume_at, secrets, secrets_at, venv, env, config_at,
                 volume)
    made.workdir = made.host(workdir)
    return made


def render_config(image: Image, out: Path) -> Path:
    """The image's config with each container path replaced by where it is here."""
    at = image.config_at
    raw = yaml.safe_load(image.host(at).read_text())

    def mapped(p: str) -> str:
        return str(image.host(PurePosixPath(os.path.normpath(at.parent / p))))

    raw["rules"] = [mapped(p) for p in raw["rules"]]
    raw["packs"] = [mapped(p) for p in raw["packs"]]
    if raw.get("inventory"):
        raw["inventory"] = mapped(raw["inventory"])
    store = PurePosixPath(raw["store"]["path"])
    assert store.is_relative_to(image.volume_at), f"the store {store} is not on the volume"
    raw["store"]["path"] = mapped(str(store))
    for token in raw["api"]["auth"]["tokens"]:
        kind, _, ref = token["token"].partition(":")
        assert kind == "file", f"token {token['name']}: a mounted file, not {kind}:"
        assert PurePosixPath(ref).is_relative_to(image.secrets_at), ref
        token["token"] = f"file:{mapped(ref)}"
    out.write_text(yaml.safe_dump(raw))
    return out


def _env(image: Image, **extra: str) -> dict[str, str]:
    env = dict(image.env)
    env["HOME"] = str(image.host(PurePosixPath(env.get("HOME", "/"))))
    env["PATH"] = f"{image.venv / 'bin'}:/usr/bin:/bin"
    return env | extra


def test_image_default_config_passes_check(image: Image, tmp_path: Path) -> None:
    """``loopd check`` from the installed wheel accepts the image's default config with the
    shipped packs and rules at the image's paths."""
    config = render_config(image, tmp_path / "loopd.yaml")
    done = _run([str(image.venv / "bin" / "loopd"), "check", "-c", str(config)],
                env=_env(image), cwd=image.workdir)
    assert done.stdout.rstrip().endswith(": OK"), done.stdout
    assert "0 rules" not in done.stdout and " 0 packs" not in done.stdout, done.stdout


def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_status(url: str, status: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := _get(url)) != status:
        assert time.monotonic() < deadline, f"{url}: {got} after {timeout}s, not {status}"
        time.sleep(0.05)


@pytest.fixture
def daemon(image: Image, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    config = render_config(image, tmp_path / "loopd.yaml")
    log = (tmp_path / "loopd.log").open("wb")
    # the image's ENTRYPOINT + CMD, with the API on loopback (LOOPD_LISTEN) for the test
    proc = subprocess.Popen(
        [str(image.venv / "bin" / "loopd"), "run", "-c", str(config)],
        env=_env(image, LOOPD_LISTEN=f"127.0.0.1:{port}"), cwd=image.workdir,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_image_runs_with_a_read_only_root(
        image: Image, daemon: tuple[subprocess.Popen[bytes], int], tmp_path: Path) -> None:
    """``loopd run`` on the image's config answers /healthz and /readyz without a token,
    wants one elsewhere, and writes only to the volume: the root file system, the mounted
    tokens and the installed environment are unchanged after the run."""
    before = {p: snapshot(p) for p in (image.rootfs, image.secrets, image.venv)}
    proc, port = daemon
    try:
        wait_port(port, timeout=30)
    except TimeoutError:
        pytest.fail((tmp_path / "loopd.log").read_text()[-4000:])
    base = f"http://127.0.0.1:{port}"
    assert _get(f"{base}/healthz") == 200
    _wait_status(f"{base}/readyz", 200)  # ready once the store and sources are up
    assert _get(f"{base}/v1/rules") == 401
    assert _get(f"{base}/v1/rules", TOKENS["admin"]) == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, (tmp_path / "loopd.log").read_text()[-4000:]
    for root, files in before.items():
        assert snapshot(root) == files, f"{root.name} changed: the root must be read-only"
    written = [p.name for p in image.volume.rglob("*")]
    assert any(name.startswith("loopd.db") for name in written), written
