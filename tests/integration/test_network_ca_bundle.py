"""network.ca_bundle in a real filtered sandbox: HTTPS to an allowed test host whose certificate
only the given bundle vouches for (the test internet's own, as a TLS-inspecting proxy's CA would
be) verifies with the bundle and fails certificate checks without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .internet import Internet
from .kapsis_runner import Kapsis
from .sandbox_probe import config, probe_project

pytestmark = pytest.mark.integration

# A verifying client, as an agent's tools are: the default context, which reads SSL_CERT_FILE.
FETCH = (
    'python3 -c "import urllib.request; '
    "print('status', urllib.request.urlopen('https://allowed.test/ca', timeout=20).status)\""
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return probe_project(tmp_path)


def test_https_verifies_through_the_given_bundle(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    bundle = internet.workdir / "cert.pem"
    settings = config(tmp_path, internet, extra=f"  ca_bundle: {bundle}\n")
    result = kapsis.run(project, FETCH, "--config", str(settings), "--allow", "allowed.test")

    assert result.returncode == 0, result.stderr
    assert "status 200" in result.stdout
    assert "/ca" in [request.path for request in internet.http_requests()]


def test_control_without_it_the_same_request_fails_certificate_checks(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    settings = config(tmp_path, internet)
    result = kapsis.run(project, FETCH, "--config", str(settings), "--allow", "allowed.test")

    assert result.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout + result.stderr
