"""The Helm chart helm/loopd, rendered by the real helm binary.

Every manifest is validated against the Kubernetes schemas kubernetes-validate ships, the
loopd.yaml, rules and inventory it renders pass `loopd check`, and the output never runs
as root, never escalates and never contains a secret value.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import orjson
import pytest
import yaml

from tests.servers.helm import ROOT, helm

CHART = ROOT / "helm" / "loopd"
HA_VALUES = CHART / "ci" / "ha-values.yaml"
# two supported minor versions whose schemas kubernetes-validate ships (no network)
K8S_VERSIONS = ("1.33.0", "1.35.0")
# built into Kubernetes, so validated; the monitoring.coreos.com kinds are CRDs
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SECRETS_DIR = "/var/run/secrets/loopd"
FAKE_SECRET = "s3cr3t-never-rendered-7f2a9c"


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *args], capture_output=True, text=True, timeout=60, check=False,
    )


def _template(*args: str) -> list[dict[str, Any]]:
    proc = _helm("template", "rel", str(CHART), "--namespace", "ops", *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _render_text(*args: str) -> str:
    proc = _helm("template", "rel", str(CHART), "--namespace", "ops", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = _kind(docs, "StatefulSet")
    spec: dict[str, Any] = sts["spec"]["template"]["spec"]
    return spec


VARIANTS = {"default": (), "ha": ("-f", str(HA_VALUES))}


def test_chart_app_version_is_the_package_version() -> None:
    """Chart.yaml's appVersion equals pyproject.toml's version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert str(chart["appVersion"]) == project["version"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_passes(variant: str) -> None:
    """`helm lint --strict` accepts the chart with the default and the HA values."""
    proc = _helm("lint", "--strict", str(CHART), *VARIANTS[variant])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid_kubernetes(variant: str) -> None:
    """Every rendered built-in manifest passes the strict schemas of two Kubernetes minors."""
    docs = _template(*VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_default_is_one_replica_with_sqlite_on_a_claim() -> None:
    """The default values give one pod whose SQLite store lives on a PersistentVolumeClaim."""
    docs = _template()
    (sts,) = _kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    config = yaml.safe_load(_kind(docs, "ConfigMap")[0]["data"]["loopd.yaml"])
    assert config["store"] == {"path": "/var/lib/loopd/loopd.db"}
    assert not _kind(docs, "PodDisruptionBudget")
    container = _pod_spec(docs)["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/loopd"
    # the image's entrypoint (Dockerfile) is `loopd run`: args replace only its CMD
    entrypoint = next(line for line in (CHART.parents[1] / "Dockerfile").read_text()
                      .splitlines() if line.startswith("ENTRYPOINT"))
    assert container["command"] == ["loopd", "run"] == orjson.loads(entrypoint.split(" ", 1)[1])
    assert container["args"] == ["-c", "/etc/loopd/loopd.yaml"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_ha_values_give_three_replicas_on_postgres() -> None:
    """The HA example: 3 pods, Postgres DSN and tokens by file: reference, PDB, monitoring."""
    docs = _template("-f", str(HA_VALUES))
    (sts,) = _kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert "volumeClaimTemplates" not in sts["spec"]
    config = yaml.safe_load(_kind(docs, "ConfigMap")[0]["data"]["loopd.yaml"])
    assert config["store"]["type"] == "postgres"
    assert config["store"]["dsn"] == "file:/var/run/secrets/loopd/pg-dsn"
    assert {t["token"] for t in config["api"]["auth"]["tokens"]} == {
        "file:/var/run/secrets/loopd/alertmanager-token",
        "file:/var/run/secrets/loopd/oncall-token",
    }
    assert {"healthz", "readyz"} <= set(config["api"]["auth"]["open"])
    assert next(s["type"] for s in config["sources"]) == "kafka"
    assert _kind(docs, "PodDisruptionBudget")
    assert _kind(docs, "ServiceMonitor")
    assert _kind(docs, "NetworkPolicy")
    (rule,) = _kind(docs, "PrometheusRule")
    exprs = " ".join(r["expr"] for r in rule["spec"]["groups"][0]["rules"])
    for metric in ("loopd_source_up", "loopd_circuit_open", "loopd_runs_total",
                   "loopd_queue_depth", "loopd_decisions_total"):
        assert metric in exprs
    assert "4500" in exprs  # 90% of engine.queue_size 5000
    env = _pod_spec(docs)["containers"][0]["env"]
    replica = next(e for e in env if e["name"] == "LOOPD_REPLICA")
    assert replica["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_vol = next(v for v in _pod_spec(docs)["volumes"] if v["name"] == "secrets")
    assert secret_vol["secret"]["secretName"] == "loopd-secrets"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_container_runs_as_root_or_escalates(variant: str) -> None:
    """Pods run non-root with a read-only root, no privilege escalation, no capabilities."""
    pod = _pod_spec(_template(*VARIANTS[variant]))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_no_secret_value_in_rendered_output(tmp_path: Path) -> None:
    """A secret's value given alongside its Secret's name never reaches the rendered text."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        # a values file that also carries the Secret's content, as a careless user might
        # (under keys the chart does not read): only the name may be used
        "existingSecret": "loopd-secrets",
        "inventory": {"entities": {"web-1": {"address": "10.0.0.5", "credentials": "ssh"}},
                      "credentials": {"ssh": {"username": "ops",
                                              "key": "file:/var/run/secrets/loopd/ssh-key"}}},
        "extraEnv": [{"name": "LOOPD_SSH_PASSWORD", "valueFrom": {
            "secretKeyRef": {"name": "loopd-secrets", "key": "ssh-password"}}}],
    }))
    text = _render_text("-f", str(HA_VALUES), "-f", str(values),
                        "--set-string", f"secretValues.pg-dsn={FAKE_SECRET}")
    assert FAKE_SECRET not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert not _kind(docs, "Secret")  # the chart creates none: references only
    assert "loopd-secrets" in text


def test_replicas_with_sqlite_fail_with_a_clear_message() -> None:
    """replicaCount 2 on the SQLite store is refused, naming the fix."""
    proc = _helm("template", "rel", str(CHART), "--set", "replicaCount=2")
    assert proc.returncode != 0
    assert "several replicas need store.type=postgres" in proc.stderr


def test_wrong_values_fail_with_the_schema_message(tmp_path: Path) -> None:
    """A values file the schema refuses fails `helm template` naming the field."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("store: {type: mysql}\nreplicaCount: zero\n")
    proc = _helm("template", "rel", str(CHART), "-f", str(broken))
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert "/store/type" in proc.stderr
    assert "/replicaCount" in proc.stderr


def _loopd_check(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Write the ConfigMap's files to tmp_path with container paths mapped, then check."""
    (cm,) = _kind(docs, "ConfigMap")
    data: dict[str, str] = cm["data"]
    (tmp_path / "rules").mkdir()
    for key, body in data.items():
        if key.startswith("rules_"):
            (tmp_path / "rules" / key.removeprefix("rules_")).write_text(body)
    (tmp_path / "inventory.yaml").write_text(data["inventory.yaml"])
    # the mounted existingSecret: each file: reference must name a key of it
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    text = data["loopd.yaml"].replace(SECRETS_DIR, str(secrets))
    for ref in re.findall(rf"file:{re.escape(str(secrets))}/([A-Za-z0-9_.-]+)", text):
        (secrets / ref).write_text(f"{ref}-a-test-value-of-32-chars-or-more")
    config = yaml.safe_load(text)
    assert config["rules"] == ["/etc/loopd/rules"]
    assert config["packs"] == ["/opt/loopd/packs"]
    assert config["inventory"] == "/etc/loopd/inventory.yaml"
    config["rules"] = [str(tmp_path / "rules")]
    config["packs"] = [str(ROOT / "packs")]  # the image ships the repo's packs
    config["inventory"] = str(tmp_path / "inventory.yaml")
    if "path" in config["store"]:
        config["store"]["path"] = str(tmp_path / "state" / "loopd.db")
    path = tmp_path / "loopd.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "loopd.cli", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_config_passes_loopd_check(variant: str, tmp_path: Path) -> None:
    """The loopd.yaml, rules and inventory in the ConfigMap pass `loopd check`."""
    proc = _loopd_check(_template(*VARIANTS[variant]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_extra_packs_and_an_existing_config_map_render_valid_manifests() -> None:
    """extraPacks land under /etc/loopd/packs; existingConfigMap replaces the chart's own."""
    docs = _template("--set-string", "extraPacks.mypack.pack\\.yaml=name: mypack",
                     "--set-string", "extraPacks.mypack.workflows/fix\\.yaml=tasks: []")
    config = yaml.safe_load(_kind(docs, "ConfigMap")[0]["data"]["loopd.yaml"])
    assert config["packs"] == ["/opt/loopd/packs", "/etc/loopd/packs"]
    volume = next(v for v in _pod_spec(docs)["volumes"] if v["name"] == "config")
    paths = {i["path"] for i in volume["configMap"]["items"]}
    assert {"packs/mypack/pack.yaml", "packs/mypack/workflows/fix.yaml"} <= paths
    docs = _template("--set", "existingConfigMap=my-loopd")
    assert not _kind(docs, "ConfigMap")
    volume = next(v for v in _pod_spec(docs)["volumes"] if v["name"] == "config")
    assert volume["configMap"] == {"name": "my-loopd"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
