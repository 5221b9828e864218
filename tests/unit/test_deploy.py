"""deploy/: the Kubernetes manifests validate against a current Kubernetes, the ConfigMap's
TOML passes `muxproxy check`, the timings agree, and the container entrypoint derives
`workers` from the cgroup CPU limit."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from muxproxy.config import loads

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
ENTRYPOINT = ROOT / "deploy" / "container" / "entrypoint.sh"
MANIFESTS = sorted(KUBE.glob("*.yaml"))
# The newest Kubernetes the installed kubernetes-validate knows (1.37 with 1.37.0).
KUBERNETES = kubernetes_validate.latest_version()


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def resource(kind: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == kind:
                return doc
    raise AssertionError(f"no {kind} in {KUBE}")


def test_every_kind_the_deployment_needs_is_there() -> None:
    kinds = sorted(d["kind"] for p in MANIFESTS for d in documents(p))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"].__setitem__("replicas", "two"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("readiness", {}),
        lambda d: d["spec"].pop("selector"),
    ],
    ids=["wrong type", "unknown field", "missing required field"],
)
def test_an_invalid_manifest_is_refused(break_it: Any) -> None:
    doc = copy.deepcopy(resource("Deployment"))
    break_it(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def configmap_toml() -> str:
    return str(resource("ConfigMap")["data"]["muxproxy.toml"])


def test_configmap_toml_passes_muxproxy_check(tmp_path: Path) -> None:
    conf = tmp_path / "muxproxy.toml"
    conf.write_text(configmap_toml())
    done = subprocess.run(
        [sys.executable, "-m", "muxproxy", "check", "-c", str(conf)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_sigkill_never_cuts_the_drain_short() -> None:
    cfg = loads(configmap_toml())
    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + cfg.proxy.grace_period
    probe = pod["containers"][0]["readinessProbe"]["httpGet"]
    assert cfg.admin is not None
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports[probe["port"]] == cfg.admin.listen.port


def test_the_backend_name_is_the_headless_service() -> None:
    cfg = loads(configmap_toml())
    backend = cfg.clusters[0].backends[0]
    headless = [
        d
        for p in MANIFESTS
        for d in documents(p)
        if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
    ]
    assert len(headless) == 1
    name = headless[0]["metadata"]["name"]
    assert backend.host.startswith(f"{name}.") and backend.host.endswith(".svc.cluster.local")
    assert backend.port in {p["port"] for p in headless[0]["spec"]["ports"]}


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000", 2), ("250000 100000", 3), ("50000 100000", 1), (None, 0)],
    ids=["2 CPUs", "2.5 CPUs rounds up", "half a CPU", "no limit: nproc"],
)
def test_entrypoint_takes_workers_from_the_cpu_limit(
    tmp_path: Path, cpu_max: str | None, expected: int
) -> None:
    conf = tmp_path / "in.toml"
    conf.write_text(configmap_toml())
    limit = tmp_path / "cpu.max"
    limit.write_text(f"{cpu_max}\n" if cpu_max else "max 100000\n")
    env = {
        "PATH": os.environ["PATH"],
        "MUXPROXY_CONFIG": str(conf),
        "MUXPROXY_CPU_MAX_FILE": str(limit),
        "MUXPROXY_RUNTIME_CONFIG": str(tmp_path / "out.toml"),
    }
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    assert loads(done.stdout).proxy.workers == (expected if cpu_max else nproc)


SYSTEMD_UNIT = ROOT / "deploy" / "systemd" / "muxproxy.service"


def systemd_warnings(unit: Path) -> str:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (done.stdout + done.stderr).strip() or ("" if done.returncode == 0 else "failed")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    assert systemd_warnings(SYSTEMD_UNIT) == ""
    broken = tmp_path / "muxproxy.service"  # the check can fail: a bad value is reported
    broken.write_text(SYSTEMD_UNIT.read_text().replace("Type=exec", "Type=bogus"))
    assert "bogus" in systemd_warnings(broken)


def test_systemd_unit_reloads_with_sighup_and_outwaits_the_drain() -> None:
    keys = dict(
        line.split("=", 1)
        for line in SYSTEMD_UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(keys["LimitNOFILE"]) >= 1_000_000
    grace = loads(configmap_toml()).proxy.grace_period  # the same drain as in Kubernetes
    assert float(keys["TimeoutStopSec"].removesuffix("s")) > grace
