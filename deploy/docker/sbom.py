"""Write the CycloneDX 1.6 SBOM (JSON, on stdout) of the image this runs in.

scripts/build-images.sh runs it in each built image, with the SBOM tool (cyclonedx-bom,
installed from requirements/sbom-tool.lock into a directory of its own, mounted read-only)
first on ``sys.path``; nothing of it is in the image. The SBOM holds:

- every Python distribution in the image's venv (``cyclonedx-py environment
  /opt/concord/bin/python``: name, version, licence, PyPI purl; the tool's own packages are not
  on that interpreter's path, so they are not listed);
- every Debian package (``dpkg-query``; purl ``pkg:deb/debian/...``), the interpreter and
  the operating system;
- the image itself as the main component (name, tag, id, base image and its digest).

Usage: python sbom.py TOOL_DIR NAME TAG IMAGE_ID BASE_IMAGE BASE_DIGEST
(SOURCE_DATE_EPOCH, when set, is the SBOM's timestamp: the image's creation time.)
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

VENV_PYTHON = "/opt/concord/bin/python"


def _debian_packages(distro: str) -> list[dict[str, object]]:
    from packageurl import PackageURL

    listing = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Architecture}\t${source:Package}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    components = []
    for line in sorted(listing.splitlines()):
        name, version, arch, source = line.split("\t")
        qualifiers = {"arch": arch, "distro": distro}
        if source and source != name:
            qualifiers["upstream"] = source
        purl = PackageURL("deb", "debian", name, version, qualifiers).to_string()
        components.append(
            {
                "type": "library",
                "bom-ref": purl,
                "name": name,
                "version": version,
                "purl": purl,
                "properties": [{"name": "concord:package:manager", "value": "dpkg"}],
            }
        )
    return components


def _os_release() -> dict[str, str]:
    fields = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value.strip('"')
    return fields


def main(argv: list[str]) -> int:
    tool_dir, name, tag, image_id, base, base_digest = argv
    sys.path.insert(0, tool_dir)
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from cyclonedx_py._internal.cli import run

    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "environment.cdx.json"
        argv_env = [
            "environment",
            "--sv",
            "1.6",
            "--of",
            "JSON",
            "--output-reproducible",
            "--no-validate",
        ]
        code = run(argv=[*argv_env, "-o", str(out), VENV_PYTHON])
        if code:
            return int(code)
        bom = json.loads(out.read_text())

    release = _os_release()
    distro = f"{release.get('ID', 'debian')}-{release.get('VERSION_ID', '')}".rstrip("-")
    components = bom.setdefault("components", [])
    components.append(
        {
            "type": "operating-system",
            "bom-ref": f"os:{distro}",
            "name": release.get("ID", "debian"),
            "version": release.get("VERSION_ID", ""),
            "description": release.get("PRETTY_NAME", ""),
        }
    )
    components.append(
        {
            "type": "application",
            "bom-ref": f"pkg:generic/cpython@{platform.python_version()}",
            "name": "cpython",
            "version": platform.python_version(),
            "purl": f"pkg:generic/cpython@{platform.python_version()}",
            "properties": [
                {"name": "concord:python:executable", "value": sys._base_executable},
            ],
        }
    )
    components.extend(_debian_packages(distro))

    properties = [
        {"name": "concord:image:id", "value": image_id},
        {"name": "concord:image:base", "value": base},
    ]
    if base_digest:
        properties.append({"name": "concord:image:base-digest", "value": base_digest})
    bom.setdefault("metadata", {})["component"] = {
        "type": "container",
        "bom-ref": f"image:{name}:{tag}",
        "name": name,
        "version": tag,
        "properties": properties,
    }
    text = json.dumps(bom, indent=2, sort_keys=False) + "\n"
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        print(f"sbom: the SBOM is not valid CycloneDX 1.6: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
