"""network.ca_bundle: the sandbox's HTTPS clients trust the CAs the host trusts (a
TLS-inspecting proxy's), through a read-only mount the common clients' variables name; and
`kapsis setup --check` says when the host trusts CAs the image does not."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kapsis.config.trust import UntrustedConfigError
from kapsis.errors import ConfigError
from kapsis.host.requirements import check_ca_bundle
from kapsis.sandbox import ca_bundle
from kapsis.sandbox.ca_bundle import CA_TARGET, CA_VARIABLES, certificates, extra_host_cas
from kapsis.sandbox.run_config import load_trusted_config


def ca_pem(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def host_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bundle = tmp_path / "host-ca.crt"
    bundle.write_bytes(ca_pem("Public Root") + ca_pem("Corp Inspecting Proxy CA"))
    monkeypatch.setattr(ca_bundle, "HOST_BUNDLES", (str(bundle),))
    return bundle


def test_host_mounts_the_hosts_bundle_read_only_and_names_it(make_plan, host_bundle) -> None:
    plan = make_plan(config="network:\n  ca_bundle: host\n")
    (mount,) = [m for m in plan.mounts if m.target == CA_TARGET]
    assert mount.source == str(host_bundle) and mount.read_only
    assert all(plan.env[name] == CA_TARGET for name in CA_VARIABLES)


def test_a_pem_file_may_be_named_and_an_explicit_variable_wins(make_plan, tmp_path) -> None:
    pem = tmp_path / "corp.pem"
    pem.write_bytes(ca_pem("Corp CA"))
    plan = make_plan(
        config=f"network:\n  ca_bundle: {pem}\nenvironment:\n  set:\n    PIP_CERT: /etc/other\n"
    )
    assert [m.source for m in plan.mounts if m.target == CA_TARGET] == [str(pem)]
    assert plan.env["PIP_CERT"] == "/etc/other" and plan.env["SSL_CERT_FILE"] == CA_TARGET


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_a_missing_or_empty_bundle_is_a_one_line_error(make_plan, tmp_path, content) -> None:
    pem = tmp_path / "bundle.pem"
    if content is not None:
        pem.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        make_plan(config=f"network:\n  ca_bundle: {pem}\n")
    assert "network.ca_bundle" in str(refused.value) and "\n" not in str(refused.value)


def test_without_it_the_image_keeps_its_own(make_plan) -> None:
    plan = make_plan()
    assert all(m.target != CA_TARGET for m in plan.mounts)
    assert not set(CA_VARIABLES) & set(plan.env)


def test_a_project_file_may_not_name_the_cas_the_agent_trusts(project: Path) -> None:
    """A CA of the agent's choosing would let a man in the middle read its HTTPS."""
    (project / "agent-sandbox.yaml").write_text("network:\n  ca_bundle: /tmp/attacker.pem\n")
    with pytest.raises(UntrustedConfigError, match=r"network\.ca_bundle"):
        load_trusted_config(project, None, {})


def test_the_cas_the_host_trusts_and_the_image_does_not_are_named() -> None:
    public, corp = ca_pem("Public Root"), ca_pem("Corp Inspecting Proxy CA")
    assert extra_host_cas(public + corp, public) == ["CN=Corp Inspecting Proxy CA"]
    assert extra_host_cas(public, public + corp) == []
    lacking = check_ca_bundle(extra_host_cas(public + corp, public))
    assert not lacking.ok and not lacking.required
    assert "Corp Inspecting Proxy CA" in lacking.detail
    assert lacking.fix is not None and "network.ca_bundle: host" in lacking.fix
    assert check_ca_bundle([]).ok


def test_a_cluster_run_carries_the_certificates_and_mounts_them_the_same_way(
    project: Path, tmp_path: Path, host_bundle: Path
) -> None:
    """The Pod cannot mount this machine's file: the certificates travel in the request, go
    to a ConfigMap of the request's own, and are mounted read-only where a local run has them."""
    from kapsis.k8s.render import render_request
    from kapsis.k8s.settings import OperatorSettings
    from tests.unit.test_k8s_submission import submit

    config = "network:\n  ca_bundle: host\nenvironment:\n  set: {PIP_CERT: /etc/other}\n"
    spec = submit(project, tmp_path, config).spec
    assert spec.caBundle is not None
    assert certificates(spec.caBundle.inline.encode()) == certificates(host_bundle.read_bytes())

    rendered = render_request(
        "r", "team", "0000-1111", spec, OperatorSettings(dns_servers=("10.96.0.10",))
    )
    (bundle_map,) = [m for m in rendered.config_maps if m["metadata"]["name"].endswith("-ca")]
    assert bundle_map["data"]["ca-bundle.crt"] == spec.caBundle.inline
    agent = next(c for c in rendered.pod["spec"]["containers"] if c["name"] == "agent")
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == CA_TARGET]
    assert mount["readOnly"] is True
    (volume,) = [v for v in rendered.pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == bundle_map["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["SSL_CERT_FILE"] == CA_TARGET and env["PIP_CERT"] == "/etc/other"
    # Only the agent gets it; without the setting, nothing.
    others = [c for c in rendered.pod["spec"]["containers"] if c["name"] != "agent"]
    assert all(m["mountPath"] != CA_TARGET for c in others for m in c.get("volumeMounts", []))
    plain = render_request("r", "team", "0000-1111", submit(project, tmp_path).spec,
                           OperatorSettings(dns_servers=("10.96.0.10",)))  # fmt: skip
    plain_agent = next(c for c in plain.pod["spec"]["containers"] if c["name"] == "agent")
    assert "SSL_CERT_FILE" not in {e["name"] for e in plain_agent["env"]}


@pytest.mark.parametrize(
    "inline",
    [
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n$(touch /tmp/x)\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\x0b$(x)\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\u2028\u00e9\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\n" + "A" * (600 * 1024) + "\n-----END CERTIFICATE-----\n",
    ],
)
def test_a_request_whose_bundle_is_not_plain_pem_or_too_big_is_refused(inline: str) -> None:
    from pydantic import ValidationError

    from kapsis.k8s.resource import CaBundleSpec

    with pytest.raises(ValidationError):
        CaBundleSpec(inline=inline)


def test_a_bundle_with_windows_line_endings_travels_to_a_cluster_too(tmp_path: Path) -> None:
    from kapsis.k8s.resource import CaBundleSpec
    from kapsis.sandbox.ca_bundle import bundle_text

    pem = ca_pem("Corp CA")
    bundle = tmp_path / "corp.pem"
    bundle.write_bytes(pem.replace(b"\n", b"\r\n"))
    inline = CaBundleSpec(inline=bundle_text(bundle, 512 * 1024)).inline
    assert certificates(inline.encode()) == certificates(pem)
