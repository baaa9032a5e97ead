"""Build-tool settings in a real sandbox: the agent's tools find the approved sources, and the
agent cannot rewrite or remove the files that name them (it can still use its own ~/.m2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .kapsis_runner import Kapsis

pytestmark = pytest.mark.integration

CONFIG = """
build_tools:
  maven: {mirror_url: "https://nexus.corp.example/maven2/", block_snapshots: true}
  npm: {registry: "https://npm.corp.example/"}
  pip: {index_url: "https://pypi.corp.example/simple"}
"""

READ = r"""
python3 - <<'PY'
import configparser, os, pathlib
import xml.etree.ElementTree as ET
ns = "{http://maven.apache.org/SETTINGS/1.2.0}"
pip = configparser.ConfigParser()
pip.read("/etc/pip.conf")
root = ET.parse(os.path.expanduser("~/.m2/settings.xml")).getroot()
npmrc = pathlib.Path.home().joinpath(".npmrc").read_text()
print("pip-index=" + pip["global"]["index-url"])
print("npm-registry=" + [l for l in npmrc.splitlines() if l.startswith("registry=")][0][9:])
print("maven-mirrors=" + ",".join(m.findtext(ns + "url") for m in root.iter(ns + "mirror")))
print("env=" + os.environ["PIP_INDEX_URL"] + " " + os.environ["NPM_CONFIG_REGISTRY"])
PY
"""
TAMPER = """
echo 'registry=https://evil.example/' >> ~/.npmrc; echo "tamper-npmrc=$?"
rm -f ~/.npmrc; echo "remove-npmrc=$?"
echo '[global]' > /etc/pip.conf; echo "tamper-pip=$?"
echo '<settings/>' > ~/.m2/settings.xml; echo "tamper-maven=$?"
mv ~/.m2 ~/m2-moved; echo "move-m2=$?"
mkdir -p ~/.m2/repository/x && echo jar > ~/.m2/repository/x/a.jar && echo "m2-writable=yes"
"""


@pytest.mark.parametrize("profile", ["standard", "strict"])
def test_the_agent_sees_the_approved_sources_and_cannot_change_them(
    kapsis: Kapsis, tmp_path: Path, profile: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = tmp_path / "tools.yaml"
    config.write_text(CONFIG)

    result = kapsis.run(
        project,
        READ + TAMPER + READ,
        "--config", str(config), "--network-mode", "none", "--security-profile", profile,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [
        "pip-index=https://pypi.corp.example/simple",
        "npm-registry=https://npm.corp.example/",
        "maven-mirrors=https://nexus.corp.example/maven2/,http://0.0.0.0/",
        "env=https://pypi.corp.example/simple https://npm.corp.example/",
    ]
    # Read before and after the tampering: the same.
    assert [
        line for line in lines if line.split("=")[0] in {e.split("=")[0] for e in expected}
    ] == (expected + expected)
    for attempt in ("tamper-npmrc", "remove-npmrc", "tamper-pip", "tamper-maven", "move-m2"):
        assert f"{attempt}=" in result.stdout and f"{attempt}=0" not in result.stdout
    assert "m2-writable=yes" in result.stdout
