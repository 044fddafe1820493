"""TLS, mutual TLS and bearer tokens, with a throwaway CA made by `openssl` at test time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import grpc
import make_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from visionserve.protos import grpc_service_pb2 as kpb
from visionserve.protos import grpc_service_pb2_grpc as kpb_grpc
from visionserve.protos import visionserve_pb2 as pb
from visionserve.protos import visionserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

TOKEN = "s3cret-token"
ok, _png = cv2.imencode(".png", np.full((8, 8, 3), (200, 0, 0), np.uint8))  # BGR: blue
REQUEST = pb.ClassifyRequest(model=make_models.CLASSIFIER, image=pb.Image(encoded=_png.tobytes()))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        *key,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        subject,
        cwd=directory,
    )
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
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
        "1",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.pem/.key for localhost + 127.0.0.1; client.pem/.key (clientAuth)."""
    directory = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=visionserve test CA",
        cwd=directory,
    )
    _issue(
        directory,
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    _issue(directory, "client", "/CN=test client", "extendedKeyUsage=clientAuth\n")
    return directory


def _credentials(pki: Path, client_cert: bool) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes(),
        certificate_chain=(pki / "client.pem").read_bytes(),
    )


def _classify(channel: grpc.Channel, **kwargs: object) -> str:
    return pb_grpc.VisionServiceStub(channel).Classify(REQUEST, timeout=10, **kwargs).top[0].label


def test_tls_serves_encrypted_and_refuses_plaintext(start_server, pki: Path) -> None:
    server = start_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with grpc.secure_channel(f"localhost:{server.port}", _credentials(pki, False)) as channel:
        assert _classify(channel) == "blue"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            _classify(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_server, pki: Path) -> None:
    server = start_server(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )
    address = f"localhost:{server.port}"
    with grpc.secure_channel(address, _credentials(pki, True)) as channel:
        assert _classify(channel) == "blue"
    with grpc.secure_channel(address, _credentials(pki, False)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _classify(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "no authorization metadata"),
        ((("authorization", "Bearer wrong"),), "a wrong bearer token"),
        ((("authorization", TOKEN),), "a wrong bearer token"),  # scheme missing
        ((("authorization", f"Bearer {TOKEN}x"),), "a wrong bearer token"),
    ],
)
def test_a_missing_or_wrong_token_is_unauthenticated(start_server, metadata, reason) -> None:
    server = start_server(auth_token=TOKEN)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            _classify(channel, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason in err.value.details()
        assert "authorization: Bearer <token>" in err.value.details()
        assert _classify(channel, metadata=(("authorization", f"Bearer {TOKEN}"),)) == "blue"


def test_token_guards_kserve_and_health_stays_open(start_server, pki: Path) -> None:
    server = start_server(auth_token=TOKEN, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with grpc.secure_channel(f"localhost:{server.port}", _credentials(pki, False)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = kserve.ServerReady(
            kpb.ServerReadyRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert reply.ready
        # streaming RPCs are guarded too
        stream = pb_grpc.VisionServiceStub(channel).SegmentStream(iter([]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_settings_refuse_half_a_tls_configuration(tmp_path: Path, pki: Path) -> None:
    from visionserve.server.settings import ServerSettings

    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerSettings(repository=tmp_path, tls_cert=pki / "server.pem")
    with pytest.raises(ValueError, match="needs tls_cert and tls_key"):
        ServerSettings(repository=tmp_path, tls_client_ca=pki / "ca.pem")
    with pytest.raises(ValueError, match="existing PEM file"):
        ServerSettings(repository=tmp_path, tls_cert=tmp_path / "x", tls_key=tmp_path / "y")
    assert TOKEN not in repr(ServerSettings(repository=tmp_path, auth_token=TOKEN))
