"""TLS and mutual TLS against real servers, with certificates the test makes (openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from convstack.client import PredictionClient, PredictionError, TlsConfig
from convstack.client.cli import status_main
from tests.client.conftest import MODEL, images, start_server
from tests.serving.helpers import make_repository

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

# The server certificate names only this host, so connecting to 127.0.0.1 needs the override.
SERVER_NAME = "serving.convstack.test"
X = images(2, seed=31)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _authority(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def _leaf(directory: Path, name: str, authority: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{authority}.pem",
        "-CAkey", f"{authority}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
        "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca signs the server and a client; rogue-ca signs an intruder's client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    _authority(directory, "ca")
    _authority(directory, "rogue-ca")
    server_ext = f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth\n"
    client_ext = "extendedKeyUsage=clientAuth\n"
    _leaf(directory, "server", "ca", server_ext)
    _leaf(directory, "client", "ca", client_ext)
    _leaf(directory, "intruder", "rogue-ca", client_ext)
    return directory


def _start(root: Path, exported_version: Path, pki: Path, *extra: str):
    base = make_repository(root / "models", exported_version, [1])
    flags = [
        f"--model_name={MODEL}",
        f"--model_base_path={base}",
        f"--tls_cert={pki / 'server.pem'}",
        f"--tls_key={pki / 'server.key'}",
        *extra,
    ]
    return start_server(root, flags)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, exported_version, pki):
    server = _start(tmp_path_factory.mktemp("tls"), exported_version, pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, exported_version, pki):
    root = tmp_path_factory.mktemp("mtls")
    server = _start(root, exported_version, pki, f"--tls_client_ca={pki / 'ca.pem'}")
    yield server
    server.stop()


def _predict(server, tls: TlsConfig | None):
    with PredictionClient(server.target, MODEL, tls=tls, retries=0, timeout=10) as client:
        return client.predict(X)


def _refused(server, tls: TlsConfig | None) -> PredictionError:
    with pytest.raises(PredictionError) as caught:
        _predict(server, tls)
    return caught.value


@pytest.mark.parametrize("form", ["bytes", "text", "path"])
def test_tls_with_the_servers_authority(tls_server, pki, form):
    path = pki / "ca.pem"
    root = {"bytes": path.read_bytes(), "text": path.read_text(), "path": path}[form]

    prediction = _predict(tls_server, TlsConfig(root, server_name_override=SERVER_NAME))

    assert prediction.version == 1
    assert prediction["classes"].shape == (2,)


def test_tls_refuses_a_server_it_cannot_verify(tls_server, pki):
    untrusted = TlsConfig(pki / "rogue-ca.pem", server_name_override=SERVER_NAME)
    wrong_name = TlsConfig(pki / "ca.pem")  # the certificate does not name 127.0.0.1

    assert _refused(tls_server, untrusted).code == "UNAVAILABLE"
    assert _refused(tls_server, wrong_name).code == "UNAVAILABLE"


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    assert _refused(tls_server, None).code == "UNAVAILABLE"


def test_mutual_tls_serves_a_client_with_a_certificate(mtls_server, pki):
    tls = TlsConfig(
        pki / "ca.pem", pki / "client.pem", pki / "client.key", server_name_override=SERVER_NAME
    )

    assert _predict(mtls_server, tls).version == 1


@pytest.mark.parametrize("client_cert", [None, "intruder"])
def test_mutual_tls_rejects_clients_without_a_trusted_certificate(mtls_server, pki, client_cert):
    chain = key = None
    if client_cert:
        chain, key = pki / f"{client_cert}.pem", pki / f"{client_cert}.key"
    tls = TlsConfig(pki / "ca.pem", chain, key, server_name_override=SERVER_NAME)

    assert _refused(mtls_server, tls).code == "UNAVAILABLE"


def test_cli_speaks_mutual_tls(mtls_server, pki, capsys):
    common = ["--target", mtls_server.target, "--model", MODEL, "--tls-ca", str(pki / "ca.pem")]
    common += ["--tls-server-name", SERVER_NAME]
    identity = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]

    assert status_main([*common, *identity]) == 0
    assert "AVAILABLE" in capsys.readouterr().out
    assert status_main(common) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_config_mistakes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(certificate_chain=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match=r"missing\.pem"):
        TlsConfig(tmp_path / "missing.pem").credentials()
