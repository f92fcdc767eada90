"""Manifests and launch recipes are checked, not just written.

Every YAML under deploy/ parses and carries the fields its kind requires (core kinds
are validated against the Kubernetes schemas of `kubernetes-validate`, offline; the
pod templates inside the PyTorchJob and RayJob are validated as Pods). Every
`schedany ...` command line in deploy/, distributed/ and the README names a real
subcommand and real flags of the installed CLI.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30"
SUBCOMMANDS = {"train", "preview", "tune", "validate"}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs.append((str(path.relative_to(ROOT)), doc))
    return docs


def test_every_manifest_parses_and_has_its_kinds_fields():
    docs = manifests()
    kinds = {doc.get("kind") for _, doc in docs}
    assert {"PyTorchJob", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    for where, doc in docs:
        if "services" in doc:  # the compose file
            assert {"train", "tensorboard"} <= set(doc["services"]), where
            for port in doc["services"]["tensorboard"].get("ports", []):
                assert str(port).startswith("127.0.0.1:"), (
                    f"{where}: TensorBoard must bind to localhost"
                )
            continue
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{where}: {doc.get('kind')} has no {field}"
        assert doc["metadata"].get("name"), where


def _pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        specs = doc["spec"]["pytorchReplicaSpecs"]
        assert "Master" in specs or "Worker" in specs
        return [spec["template"] for spec in specs.values()]
    if doc["kind"] == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    return []


def test_core_kinds_validate_against_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="dev extra kubernetes-validate"
    )
    checked = 0
    for _where, doc in manifests():
        if doc.get("apiVersion") in {"v1", "apps/v1"}:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
        for template in _pod_templates(doc) if "kind" in doc else []:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "check"},
                "spec": template["spec"],
            }
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 7


def test_custom_resources_have_their_required_fields():
    by_kind = {doc["kind"]: doc for _, doc in manifests() if "kind" in doc}
    job = by_kind["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        containers = replica["template"]["spec"]["containers"]
        assert containers[0]["name"] == "pytorch"  # the operator looks for this name
        assert containers[0]["command"], "a PyTorchJob container needs its command"
    ray = by_kind["RayJob"]
    assert ray["apiVersion"] == "ray.io/v1"
    assert ray["spec"]["entrypoint"].startswith("schedany tune ")
    assert "headGroupSpec" in ray["spec"]["rayClusterSpec"]


def _commands_in_yaml(value) -> list[list[str]]:
    """Argument lists that run schedany: a string with `schedany <sub>`, or a
    command/args list whose items include it (`-m schedany train ...`)."""
    found: list[list[str]] = []
    if isinstance(value, dict):
        command = list(value.get("command") or []) + list(value.get("args") or [])
        if all(isinstance(x, str) for x in command):
            found += _schedany_calls(command)
        for key, sub in value.items():
            if key not in {"command", "args"}:
                found += _commands_in_yaml(sub)
    elif isinstance(value, list):
        for item in value:
            found += _commands_in_yaml(item)
    elif isinstance(value, str):
        found += _commands_in_text(value)
    return found


def _schedany_calls(tokens: list[str]) -> list[list[str]]:
    calls = []
    for i, token in enumerate(tokens):
        if token.endswith(("schedany", "launch.sh")) and i + 1 < len(tokens):
            rest = tokens[i + 1 :]
            if token.endswith("launch.sh"):  # launch.sh CONFIG ... == schedany train CONFIG ...
                rest = ["train", *rest]
            if rest and rest[0] in SUBCOMMANDS:
                calls.append(rest)
    return calls


def _commands_in_text(text: str) -> list[list[str]]:
    calls = []
    for line in text.splitlines():
        line = line.strip().lstrip("$ ").split(" #")[0]
        for match in re.finditer(r"(?:^|[\s;&|(])((?:\S*/)?(?:schedany|launch\.sh)\s+.*)", line):
            try:
                tokens = shlex.split(match.group(1).rstrip("`\\ "))
            except ValueError:
                continue
            calls += _schedany_calls(tokens)
    return calls


def command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for where, doc in manifests():
        lines += [(where, call) for call in _commands_in_yaml(doc)]
        for service in doc.get(
            "services", {}
        ).values():  # compose: the image's entrypoint is schedany
            if "entrypoint" not in service and service.get("command"):
                lines.append((where, [str(x) for x in service["command"]]))
    texts = [ROOT / "README.md", *sorted((ROOT / "distributed").iterdir())]
    for path in texts:
        if path.is_file():
            lines += [
                (str(path.relative_to(ROOT)), call) for call in _commands_in_text(path.read_text())
            ]
    return lines


@cache
def _help(subcommand: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "schedany", subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_schedany_command_line_names_real_subcommands_and_flags():
    lines = command_lines()
    where_found = {where.split("/")[0] for where, _ in lines}
    assert {"deploy", "distributed", "README.md"} <= where_found, where_found
    for where, call in lines:
        subcommand, *rest = call
        assert subcommand in SUBCOMMANDS, f"{where}: unknown subcommand in {call}"
        usage = _help(subcommand)
        for token in rest:
            if token.endswith(".yaml"):  # the config or sweep it names ships with the project
                local = ROOT / token.removeprefix("/opt/schedany/")
                assert local.is_file(), f"{where}: {token} does not exist in the repository"
            if token.startswith("-") and token not in {"-", "--"}:
                flag = token.split("=")[0]
                assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", usage), (
                    f"{where}: `schedany {subcommand}` has no flag {flag} ({' '.join(call)})"
                )


def test_launcher_scripts_are_valid_bash():
    for script in ["distributed/launch.sh", "distributed/slurm.sbatch"]:
        result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_preemption_grace_periods_fit_a_checkpoint():
    """Kubernetes waits longer than torchrun, which waits for the workers' checkpoint;
    SLURM warns the batch script with SIGUSR1 ahead of the time limit, and may requeue."""
    launch = (ROOT / "distributed" / "launch.sh").read_text()
    shutdown = int(re.search(r"\$\{SHUTDOWN_TIMEOUT:-(\d+)\}", launch).group(1))
    assert "SIGUSR1" in re.search(r"PET_SIGNALS_TO_HANDLE:-([A-Z0-9,]+)", launch).group(1)
    job = next(doc for _, doc in manifests() if doc.get("kind") == "PyTorchJob")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown + 30
    sbatch = (ROOT / "distributed" / "slurm.sbatch").read_text()
    warning = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", sbatch, re.M)
    assert warning and int(warning.group(1)) >= shutdown, "SLURM must warn before killing"
    assert re.search(r"^#SBATCH --requeue$", sbatch, re.M)
    assert "scontrol requeue" in sbatch


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not _docker_works(), reason="no container engine: `docker info` fails on this machine"
)
def test_container_builds_and_runs_help():
    tag = "schedany:test"
    subprocess.run(
        ["docker", "build", "-f", "deploy/Dockerfile", "-t", tag, "."],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    result = subprocess.run(
        ["docker", "run", "--rm", tag], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "train" in result.stdout
