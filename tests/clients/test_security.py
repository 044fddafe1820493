"""TLS, mutual TLS and the bearer token, client side, against a real server that requires them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import make_models
import numpy as np
import pytest
from client_helpers import make_dataset

from visionserve.cli import main
from visionserve.clients import RetryPolicy, VisionClient, VisionServeError
from visionserve.server.settings import ServerSettings

SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerSettings)}
pytestmark = [
    pytest.mark.skipif(
        not {"tls_cert", "tls_key", "auth_token"} <= SERVER_FIELDS,
        reason="the server has no TLS / token settings yet (ServerSettings.tls_cert, auth_token)",
    ),
    pytest.mark.skipif(
        shutil.which("openssl") is None, reason="openssl is needed to make test certificates"
    ),
]
TOKEN = "s3cret-token"
NO_RETRY = RetryPolicy(retries=0)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in (("server", "localhost"), ("client", "test-client")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            *(["-extfile", "san.ext"] if name == "server" else []),
            cwd=d,
        )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=other-ca",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
        cwd=d,
    )
    return d


def image() -> np.ndarray:
    return make_models.block_image(np.random.default_rng(0))[0]


def test_tls_and_token(start_server, pki: Path) -> None:
    server = start_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key", auth_token=TOKEN)
    target = f"localhost:{server.port}"
    with VisionClient(
        target, root_certificates=pki / "ca.pem", token=TOKEN, retry_policy=NO_RETRY
    ) as client:
        assert client.segment(image(), model=make_models.SEGMENTER).mask.shape == image().shape[:2]
    for token, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", grpc.StatusCode.UNAUTHENTICATED),
    ):
        with VisionClient(
            target, root_certificates=pki / "ca.pem", token=token, retry_policy=NO_RETRY
        ) as client:
            with pytest.raises(VisionServeError) as info:
                client.list_models()
            assert info.value.code == code and "Bearer" in info.value.details
    # A server certificate the client does not trust: the handshake fails.
    with VisionClient(
        target, root_certificates=pki / "other.pem", token=TOKEN, retry_policy=NO_RETRY, timeout=3
    ) as client:
        with pytest.raises(VisionServeError) as info:
            client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(start_server, pki: Path) -> None:
    server = start_server(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )
    target = f"localhost:{server.port}"
    with VisionClient(
        target,
        root_certificates=pki / "ca.pem",
        certificate_chain=pki / "client.pem",
        private_key=pki / "client.key",
        retry_policy=NO_RETRY,
    ) as client:
        assert make_models.SEGMENTER in {m.name for m in client.list_models()}
    with VisionClient(
        target, root_certificates=pki / "ca.pem", retry_policy=NO_RETRY, timeout=3
    ) as client:
        with pytest.raises(VisionServeError) as info:
            client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_segment_cli_over_tls_with_token(start_server, pki: Path, tmp_path: Path) -> None:
    server = start_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key", auth_token=TOKEN)
    images, gts = make_dataset(tmp_path, 8)
    common = [
        "segment",
        str(images),
        "--server",
        f"localhost:{server.port}",
        "--model",
        make_models.SEGMENTER,
        "--gt",
        str(gts),
        "--no-progress",
        "--ca",
        str(pki / "ca.pem"),
    ]
    assert main([*common, "--out", str(tmp_path / "out"), "--token", TOKEN]) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["segmented"] == 8
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2  # no token: UNAUTHENTICATED
