"""The container images build from deploy/docker/*.Dockerfile (scripts/build-images.sh:
buildah, no Docker engine) and run the project's CLIs as the user the charts expect, on a
read-only root filesystem with no network. The server image is built from the server extra
(no torch), the site image from the site extra (no server code).

Needs root, and buildah, podman, runc and debootstrap (the script installs them with apt-get
where they are missing); fails with that reason otherwise, as the PostgreSQL drill does. A
cold build takes about 10 minutes (torch and the site's dependencies are installed in the
site image); after that, buildah's layer cache keeps the dependencies and only changed
code is reinstalled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.charts import SERVER_CHART, load_values, pod_specs, render

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-images.sh"
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
# As the charts' securityContext: read-only root, no capabilities, no privilege escalation;
# and no network. runc with lowered rlimits: without CAP_SYS_RESOURCE (this sandbox, some CI
# runners) neither runtime can raise podman's default rlimits, and crun refuses hybrid cgroups.
PODMAN_RUN = [
    "podman",
    "run",
    "--rm",
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

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]


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
    # One line per image: name, id, size.
    images = {
        name: rest for name, _, rest in (x.partition(" ") for x in result.stdout.splitlines())
    }
    assert set(images) == set(IMAGES.values()), result.stdout
    return images


def run_in(image: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN_RUN, image, *command], capture_output=True, text=True, timeout=300
    )


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
def test_image_user_is_the_charts_user(built: dict[str, str], which: str) -> None:
    image = IMAGES[which]
    user = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Config.User}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert {pod_user for pod_user, _, _ in chart_containers(which)} == {user}
    ids = run_in(image, "sh", "-c", 'echo "$(id -u):$(id -g)"')
    assert ids.returncode == 0, ids.stderr
    assert ids.stdout.strip() == user


@pytest.mark.parametrize("which", ["server", "site"])
def test_every_chart_command_is_in_the_image(built: dict[str, str], which: str) -> None:
    for _, where, command in chart_containers(which):
        found = run_in(IMAGES[which], "sh", "-c", f"command -v {command[0]}")
        assert found.returncode == 0, (where, command, found.stderr)


@pytest.mark.parametrize("which", ["server", "site"])
def test_image_runs_the_clis_read_only(built: dict[str, str], which: str) -> None:
    for command in COMMANDS[which]:
        result = run_in(IMAGES[which], *command)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        assert "usage" in (result.stdout + result.stderr).lower(), command
    root = run_in(IMAGES[which], "sh", "-c", "touch /opt/concord/x")
    assert root.returncode != 0
    assert "Read-only file system" in root.stderr


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
    present = (
        "import torch, importlib.util as u, importlib.metadata as m; "
        "print(torch.__version__, torch.cuda.is_available(), m.version('concord'), "
        "u.find_spec('consortium_server') is None, u.find_spec('weasyprint') is None)"
    )
    result = run_in(IMAGES["site"], "python", "-c", present)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2.13.0+cpu", "False", TAG, "True", "True"]


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
