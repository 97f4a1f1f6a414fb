"""The container images build from deploy/docker/*.Dockerfile (scripts/build-images.sh:
buildah, no Docker engine) and run the project's CLIs as the user the charts expect, on a
read-only root filesystem with no network, under tini as PID 1. The server image is built
from the server extra (no torch), the site image from the site extra (no server code), both
from hash-checked locks (requirements/*.lock, written by scripts/lock-images.sh); each build
writes a CycloneDX SBOM per image.

The lock and script checks at the top are fast and offline. The image tests (slow,
integration) need root, and buildah, podman, runc and debootstrap (the script installs them
with apt-get where they are missing); they fail with that reason otherwise, as the
PostgreSQL drill does. A cold build takes about 10 minutes (torch and the site's
dependencies are installed in the site image); after that, buildah's layer cache keeps the
dependencies and only changed code is reinstalled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.charts import SERVER_CHART, load_values, pod_specs, render

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-images.sh"
LOCKS = {
    "server": REPO / "requirements" / "server.lock",
    "site": REPO / "requirements" / "site.lock",
}
DOCKERFILES = {
    "server": REPO / "deploy" / "docker" / "server.Dockerfile",
    "site": REPO / "deploy" / "docker" / "site-node.Dockerfile",
}
TORCH_WHEELS = Path(os.environ.get("CONCORD_TORCH_WHEELS", "/opt/wheels"))
TAG = os.environ.get(
    "CONCORD_IMAGE_TAG", yaml.safe_load((SERVER_CHART / "Chart.yaml").read_text())["appVersion"]
)
IMAGES = {"server": f"localhost/concord-server:{TAG}", "site": f"localhost/concord-site-node:{TAG}"}
VALUES = {"server": "server-production.yaml", "site": "site-production.yaml"}
# What each image must run: the commands the charts give their containers.
COMMANDS = {
    "server": [
        ["consortium", "--help"],
        ["consortium", "server", "--help"],
        ["consortium", "db", "upgrade", "--help"],
        ["python", "-m", "consortium_server.federation.superlink_launcher", "--help"],
        ["flower-superlink", "--help"],  # the Flower install the launcher runs
    ],
    "site": [
        ["site-node", "--help"],
        ["site-node", "run", "--help"],
        ["site-node", "supernode", "--help"],
        ["flower-supernode", "--help"],
        ["flwr-clientapp", "--help"],
    ],
}
# The images' ENTRYPOINT; a chart `command:` replaces it, so a chart starts with it too.
TINI = ["tini", "-g", "--"]
# As the charts' securityContext: read-only root, no capabilities, no privilege escalation;
# and no network. runc with lowered rlimits: without CAP_SYS_RESOURCE (this sandbox, some CI
# runners) neither runtime can raise podman's default rlimits, and crun refuses hybrid cgroups.
PODMAN_OPTIONS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
    "--network",
    "none",
    "--read-only",
    "--cap-drop",
    "all",
    "--security-opt",
    "no-new-privileges",
]
PODMAN_RUN = ["podman", "run", "--rm", *PODMAN_OPTIONS]

F = TypeVar("F", bound=Callable[..., Any])


def image_test(test: F) -> F:
    """The tests that build and run the images: slow, integration (the lock checks are not)."""
    for mark in (pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)):
        test = mark(test)
    return test


# --- The locks (fast, offline) -------------------------------------------------------------

# Where the images run: CPython 3.11 on x86_64 Linux (the locks are resolved for it).
MARKER_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
LOCK_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def read_lock(path: Path) -> dict[str, dict[str, Any]]:
    """{canonical name: {"version", "hashes", "via"}} of a `uv pip compile --generate-hashes`
    lock (pip's hash-checking requirements format)."""
    entries: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in path.read_text().splitlines():
        if match := LOCK_ENTRY.match(line):
            current = {"version": match[2], "hashes": [], "via": []}
            entries[canonicalize_name(match[1])] = current
        elif line.startswith("    --hash=sha256:") and current is not None:
            current["hashes"].append(line.split(":", 1)[1].rstrip(" \\"))
        elif line.startswith("    #") and current is not None:
            via = line.strip("# ").removeprefix("via").strip()
            if via:
                current["via"].append(via)
        else:
            assert not line or line.startswith("#"), f"{path.name}: not a pinned entry: {line!r}"
    return entries


def pyproject_requirements(which: str) -> list[Requirement]:
    """What the image installs: pyproject's shared dependencies, the role's extra and the
    build backend (the project installs with --no-build-isolation), for the image's platform."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    texts = [
        *project["dependencies"],
        *project["optional-dependencies"][which],
        *pyproject["build-system"]["requires"],
    ]
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(MARKER_ENV)]


@pytest.mark.parametrize("which", ["server", "site"])
def test_the_lock_pins_every_pyproject_dependency(which: str) -> None:
    """Every dependency pyproject.toml names for the image is in its lock, at a version its
    specifier allows; if not, run scripts/lock-images.sh."""
    lock = read_lock(LOCKS[which])
    assert len(lock) > 50
    for requirement in pyproject_requirements(which):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in {LOCKS[which].name}: run lock-images.sh"
        version = lock[name]["version"]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCKS[which].name} pins {name}=={version}, pyproject.toml wants {requirement}: "
            "run scripts/lock-images.sh"
        )


@pytest.mark.parametrize("which", ["server", "site"])
def test_the_lock_has_nothing_pyproject_dropped_and_every_entry_hashed(which: str) -> None:
    lock = read_lock(LOCKS[which])
    named = {canonicalize_name(r.name) for r in pyproject_requirements(which)}
    for name, entry in lock.items():
        assert entry["hashes"], f"{name} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in entry["hashes"]), name
        # uv notes `concord (pyproject.toml)` on the packages pyproject names itself.
        if "concord (pyproject.toml)" in entry["via"]:
            assert name in named, f"{name} is no longer in pyproject.toml: run lock-images.sh"
    # A CUDA torch would bring the nvidia-* wheels (and triton).
    assert not [n for n in lock if n.startswith("nvidia-") or n == "triton"]


def test_the_server_lock_has_no_torch_and_the_site_lock_the_cpu_wheel() -> None:
    server = read_lock(LOCKS["server"])
    assert not {"torch", "monai", "opacus", "scikit-learn"} & set(server)
    torch = read_lock(LOCKS["site"])["torch"]
    assert torch["version"] == "2.13.0+cpu"
    # One wheel: PyPI has no +cpu build, so nothing else can match this pin and hash.
    assert len(torch["hashes"]) == 1
    wheels = sorted(TORCH_WHEELS.glob("torch-2.13.0+cpu-cp311-*.whl"))
    if wheels:
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        assert torch["hashes"] == [digest], f"the lock's torch hash is not {wheels[0].name}'s"


@pytest.mark.parametrize("which", ["server", "site"])
def test_the_dockerfiles_install_from_the_lock_under_tini(which: str) -> None:
    text = DOCKERFILES[which].read_text()
    lock = f"/src/requirements/{LOCKS[which].name}"
    assert f"pip install --require-hashes --no-deps --only-binary :all: -r {lock}" in text
    assert "pip install --no-deps --no-build-isolation /src && pip check" in text
    # Nothing else is installed with pip.
    assert text.count("pip install") == 2
    assert 'ENTRYPOINT ["/usr/bin/tini", "-g", "--"]' in text
    assert re.search(r"^ARG BASE_IMAGE=", text, re.MULTILINE)


def test_the_server_image_exposes_the_api_fleet_and_control_ports() -> None:
    (expose,) = re.findall(r"^EXPOSE (.*)$", DOCKERFILES["server"].read_text(), re.MULTILINE)
    values = yaml.safe_load((SERVER_CHART / "values.yaml").read_text())
    ports = {
        values["server"]["port"],
        values["superlink"]["port"],
        values["superlink"]["controlPort"],
    }
    assert {int(p) for p in expose.split()} == ports


@pytest.mark.parametrize(
    ("base", "require", "message"),
    [
        ("python:3.11.11-slim-bookworm@sha256:abc", "0", "the digest must be @sha256:"),
        ("python:3.11.11-slim-bookworm@latest", "0", "the digest must be @sha256:"),
        ("python:3.11.11-slim-bookworm", "1", "has no digest"),
    ],
)
def test_the_build_script_refuses_a_bad_or_missing_base_digest(
    base: str, require: str, message: str
) -> None:
    """Checked before anything is installed, pulled or built."""
    env = {**os.environ, "CONCORD_BASE_IMAGE": base, "CONCORD_REQUIRE_BASE_DIGEST": require}
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def chart_containers(which: str) -> list[tuple[str, str, list[str]]]:
    """(pod user "uid:gid", container, command) of every container the chart runs from the
    Concord image (the helm test Pod runs another image)."""
    repository = {"server": "concord-server", "site": "concord-site-node"}[which]
    out = []
    for name, spec in pod_specs(render(which, load_values(VALUES[which]))):
        context = spec["securityContext"]
        user = f"{context['runAsUser']}:{context['runAsGroup']}"
        for container in spec.get("initContainers", []) + spec["containers"]:
            if f"/{repository}:" in container["image"] or f"/{repository}@" in container["image"]:
                out.append((user, f"{name}/{container['name']}", container["command"]))
    assert out
    return out


@pytest.mark.parametrize("which", ["server", "site"])
def test_the_charts_long_running_containers_start_under_tini(which: str) -> None:
    """The SuperLink launcher, the API, the agent and the SuperNode run for the pod's life
    and start children: without tini as PID 1 nothing reaps the orphans (see
    test_tini_is_pid_1_and_reaps_orphans). Init containers, the migration Job and the helm
    test Pods are one-shot commands."""
    bypassed = [
        f"{doc['metadata']['name']}/{container['name']}: {container['command'][:3]}"
        for doc in render(which, load_values(VALUES[which])).docs()
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
        if container["command"][: len(TINI)] != TINI
    ]
    assert not bypassed, bypassed


# --- The images (slow: built with buildah, run with podman) ---------------------------------


def _can_build() -> bool:
    """Root (buildah's chroot isolation), with the tools or apt-get to install them."""
    tools = ("buildah", "podman", "runc", "debootstrap")
    if os.geteuid() != 0:
        return False
    return all(shutil.which(tool) for tool in tools) or shutil.which("apt-get") is not None


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    if not _can_build():
        pytest.fail(
            "building the images needs root, and buildah/podman/runc/debootstrap or apt-get "
            "to install them (CI runs as root)"
        )
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=1700
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # One line per image: name, id, size, sbom=<path>.
    images = {
        name: rest for name, _, rest in (x.partition(" ") for x in result.stdout.splitlines())
    }
    assert set(images) == set(IMAGES.values()), result.stdout
    return images


def run_in(
    image: str, *command: str, entrypoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    options = [] if entrypoint is None else ["--entrypoint", entrypoint]
    return subprocess.run(
        [*PODMAN_RUN, *options, image, *command], capture_output=True, text=True, timeout=300
    )


def inspect(image: str, template: str) -> str:
    return subprocess.run(
        ["podman", "image", "inspect", "--format", template, image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def sbom_of(built: dict[str, str], which: str) -> dict[str, Any]:
    (path,) = re.findall(r"sbom=(\S+)", built[IMAGES[which]])
    data = json.loads(Path(path).read_text())
    assert isinstance(data, dict)
    return data


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_image_user_is_the_charts_user(built: dict[str, str], which: str) -> None:
    image = IMAGES[which]
    user = inspect(image, "{{.Config.User}}")
    assert {pod_user for pod_user, _, _ in chart_containers(which)} == {user}
    ids = run_in(image, "sh", "-c", 'echo "$(id -u):$(id -g)"')
    assert ids.returncode == 0, ids.stderr
    assert ids.stdout.strip() == user


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_every_chart_command_is_in_the_image(built: dict[str, str], which: str) -> None:
    for _, where, command in chart_containers(which):
        # With or without the tini prefix: tini, and the program it starts.
        programs = {command[0], command[len(TINI)] if command[: len(TINI)] == TINI else command[0]}
        for program in programs:
            found = run_in(IMAGES[which], "sh", "-c", f"command -v {program}")
            assert found.returncode == 0, (where, command, found.stderr)


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_image_runs_the_clis_read_only(built: dict[str, str], which: str) -> None:
    for command in COMMANDS[which]:
        result = run_in(IMAGES[which], *command)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        assert "usage" in (result.stdout + result.stderr).lower(), command
    root = run_in(IMAGES[which], "sh", "-c", "touch /opt/concord/x")
    assert root.returncode != 0
    assert "Read-only file system" in root.stderr


@image_test
def test_the_server_image_has_no_torch_and_the_site_image_has_torch_cpu(
    built: dict[str, str],
) -> None:
    """The server image is the server extra: no torch, MONAI, Opacus (or site code); the
    site image is the site extra: torch's CPU build, and no consortium-server code."""
    absent = (
        "import importlib.util as u; "
        "print(*[m for m in ('torch', 'monai', 'opacus', 'sklearn', 'site_node') "
        "if u.find_spec(m) is not None])"
    )
    result = run_in(IMAGES["server"], "python", "-c", absent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    imported = run_in(IMAGES["server"], "python", "-c", "import torch")
    assert imported.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch'" in imported.stderr
    present = (
        "import torch, importlib.util as u, importlib.metadata as m; "
        "print(torch.__version__, torch.cuda.is_available(), m.version('concord'), "
        "u.find_spec('consortium_server') is None, u.find_spec('weasyprint') is None)"
    )
    result = run_in(IMAGES["site"], "python", "-c", present)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2.13.0+cpu", "False", TAG, "True", "True"]


@image_test
@pytest.mark.parametrize(("which", "policies"), [("server", "consortium"), ("site", "sites")])
def test_images_carry_the_shipped_policies(
    built: dict[str, str], which: str, policies: str
) -> None:
    listing = run_in(IMAGES[which], "ls", "/opt/concord/share/policies")
    assert policies in listing.stdout.split()
    found = run_in(
        IMAGES[which],
        "python",
        "-c",
        "from concord_protocol.policy.shipped import shipped_policies; print(shipped_policies())",
    )
    assert found.stdout.strip() == "/opt/concord/share/policies", found.stderr


# A child forks a grandchild and exits; the grandchild, orphaned, is re-parented to PID 1 and
# exits too. Prints PID 1's name and how many zombies are left.
ORPHAN = """
import glob, os, time
child = os.fork()
if child == 0:
    if os.fork() == 0:
        time.sleep(0.5)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(2)
def state(stat):
    try:
        return open(stat).read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
zombies = [p for p in glob.glob("/proc/[0-9]*/stat") if state(p) == "Z"]
print(open("/proc/1/comm").read().strip(), len(zombies))
"""


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_tini_is_pid_1_and_reaps_orphans(built: dict[str, str], which: str) -> None:
    assert json.loads(inspect(IMAGES[which], "{{json .Config.Entrypoint}}")) == [
        "/usr/bin/tini",
        *TINI[1:],
    ]
    reaped = run_in(IMAGES[which], "python", "-c", ORPHAN)
    assert reaped.returncode == 0, reaped.stderr
    assert reaped.stdout.split() == ["tini", "0"]
    # What a chart `command:` without tini gets: the program is PID 1 and the orphan a zombie.
    leaked = run_in(IMAGES[which], "-c", ORPHAN, entrypoint="python")
    assert leaked.returncode == 0, leaked.stderr
    pid1, zombies = leaked.stdout.split()
    assert pid1 != "tini"
    assert zombies == "1"


# The parent and its child (same process group) both report SIGTERM; the parent then waits
# for the child. tini -g sends the signal to the group: the child gets it directly.
SIGTERM = """
import os, signal, sys, time
def reporter(who):
    def report(signum, frame):
        print(who, "got SIGTERM", flush=True)
        if who == "parent":
            os.waitpid(child, 0)
        os._exit(0)
    return report
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, reporter("child"))
    print("child ready", flush=True)
    while True:
        time.sleep(1)
signal.signal(signal.SIGTERM, reporter("parent"))
while True:
    time.sleep(1)
"""


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_sigterm_reaches_the_whole_process_group(built: dict[str, str], which: str) -> None:
    name = f"concord-test-sigterm-{which}-{os.getpid()}"
    detached = ["podman", "run", "-d", "--name", name, *PODMAN_OPTIONS]
    subprocess.run(
        [*detached, IMAGES[which], "python", "-c", SIGTERM],
        capture_output=True,
        check=True,
        timeout=120,
    )
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while "child ready" not in logs and time.monotonic() < deadline:
            time.sleep(0.5)
            logs = subprocess.run(
                ["podman", "logs", name], capture_output=True, text=True, timeout=30
            ).stdout
        assert "child ready" in logs
        started = time.monotonic()
        # As the kubelet does: SIGTERM to PID 1, SIGKILL after the grace period.
        subprocess.run(["podman", "stop", "-t", "20", name], capture_output=True, timeout=60)
        assert time.monotonic() - started < 15, "the container did not stop on SIGTERM"
        logs = subprocess.run(
            ["podman", "logs", name], capture_output=True, text=True, timeout=30
        ).stdout
        assert "child got SIGTERM" in logs
        assert "parent got SIGTERM" in logs
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)


@image_test
@pytest.mark.parametrize("which", ["server", "site"])
def test_each_build_writes_a_cyclonedx_sbom(built: dict[str, str], which: str) -> None:
    sbom = sbom_of(built, which)
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["specVersion"] == "1.6"
    image = sbom["metadata"]["component"]
    assert image["type"] == "container"
    assert (image["name"], image["version"]) == (IMAGES[which].split("/")[1].split(":")[0], TAG)
    properties = {p["name"]: p["value"] for p in image["properties"]}
    assert properties["concord:image:id"] == "sha256:" + inspect(IMAGES[which], "{{.Id}}")
    # The base, pinned by digest (the script pins even the local base, given by tag), as the
    # image's OCI labels record it.
    labels = json.loads(inspect(IMAGES[which], "{{json .Labels}}"))
    digest = labels["org.opencontainers.image.base.digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert labels["org.opencontainers.image.base.name"].endswith(f"@{digest}")
    assert properties["concord:image:base"] == labels["org.opencontainers.image.base.name"]
    assert properties["concord:image:base-digest"] == labels["org.opencontainers.image.base.digest"]

    versions = {(c["name"], c.get("version")) for c in sbom["components"]}
    assert ("flwr", "1.41.0") in versions
    assert ("concord", TAG) in versions
    purls = {c["name"]: c.get("purl", "") for c in sbom["components"]}
    assert purls["flwr"].startswith("pkg:pypi/flwr@1.41.0")
    assert purls["tini"].startswith("pkg:deb/debian/tini@")
    # The lock's every package is in the image, at the lock's version.
    lock = read_lock(LOCKS[which])
    python = {
        canonicalize_name(c["name"]): c["version"]
        for c in sbom["components"]
        if c.get("purl", "").startswith("pkg:pypi/")
    }
    assert {n: e["version"] for n, e in lock.items()}.items() <= python.items()
    # Nothing of the SBOM tool itself (it is on no path of the image's venv).
    assert "cyclonedx-bom" not in python
    if which == "server":
        assert not {"torch", "monai", "opacus"} & set(python)
    else:
        assert python["torch"] == "2.13.0+cpu"
