"""TorchServe's own HTTPS end to end: a private CA and a server certificate made here (trustme), a real
TorchServe serving them on every HTTP API, and each client of this project trusting that CA: requests,
EmbeddingClient(verify=), scripts/embed.py --ca-bundle, deploy/probe.py --ca-bundle, curl, and the
`https` blocks of docs/security.md. `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` point at a bundle without
that CA wherever it matters (as on machines that set them): a CA named by the caller must still win."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import requests
import trustme
import urllib3

from image_embedder_client import EmbeddingClient, EmbeddingError
from image_embedder_testkit.bodies import npy_bytes
from image_embedder_testkit.checkout import REPO
from image_embedder_testkit.reference import reference_embeddings
from image_embedder_testkit.tls import make_server_tls, pkcs8
from image_embedder_testkit.ts_server import PORT_KEYS, TLS_KEYS, ServerTls, TorchServe, java_available
from image_embedder_tools import embed
from test_docs import Block, all_blocks, free_ports, run_session
from test_shipped_config import read_properties

pytestmark = pytest.mark.server
PROBE = os.path.join(REPO, "deploy", "probe.py")
DOC = "docs/security.md"
DOC_PORTS = {"inference_address": "8443", "management_address": "8444", "metrics_address": "8445"}


def doc_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.path == DOC]


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> ServerTls:
    return make_server_tls(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def https_server(model_store, example_archive, tls):
    if not java_available():
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    server = TorchServe(model_store, "encoder=encoder.mar", {"default_workers_per_model": "1", "enable_grpc_ssl": "true"},
                        tls=tls)
    yield server.serve("encoder")
    server.cleanup()


@pytest.fixture
def other_bundles(tmp_path, monkeypatch) -> str:
    """REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE name a bundle of another CA: what a corporate machine has."""
    path = str(tmp_path / "corporate-ca.pem")
    trustme.CA(organization_name="some other CA").cert_pem.write_to_path(path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", path)
    monkeypatch.setenv("CURL_CA_BUNDLE", path)
    return path


def images(seed: int, count: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 224, 224), dtype=np.float32)


def key_file(server: TorchServe, folder) -> str:
    path = os.path.join(folder, "key_file.json")
    shutil.copy(os.path.join(server.workdir, "key_file.json"), path)
    return path


def test_inference_management_and_metrics_answer_over_https_with_the_ca(https_server, tls, example_model,
                                                                        other_bundles):
    batch = images(1)
    r = requests.post(f"{https_server.inference_url}/predictions/encoder", data=npy_bytes(batch), verify=tls.ca_bundle,
                      headers=https_server.headers(**{"Content-Type": "application/x-npy"}), timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"], np.float32),
                               reference_embeddings(example_model, "conv1", batch), atol=1e-4)
    r = requests.get(f"{https_server.management_url}/models/encoder", headers=https_server.headers("management"),
                     verify=tls.ca_bundle, timeout=30)
    assert r.status_code == 200 and [w["status"] for w in r.json()[0]["workers"]] == ["READY"]
    r = requests.get(f"{https_server.metrics_url}/metrics", verify=tls.ca_bundle, timeout=30)
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text


def test_plain_http_on_the_https_ports_is_refused(https_server):
    """TorchServe answers plain HTTP on its HTTPS ports with 403 and serves nothing, even with the right key."""
    plain = {url: url.replace("https://", "http://") for url in
             (https_server.inference_url, https_server.management_url, https_server.metrics_url)}
    requests_ = [("GET", plain[https_server.inference_url] + "/ping", https_server.headers(), None),
                 ("POST", plain[https_server.inference_url] + "/predictions/encoder",
                  https_server.headers(**{"Content-Type": "application/x-npy"}), npy_bytes(images(4, count=1))),
                 ("GET", plain[https_server.management_url] + "/models/encoder", https_server.headers("management"),
                  None),
                 ("GET", plain[https_server.metrics_url] + "/metrics", {}, None)]
    for method, url, headers, body in requests_:
        r = requests.request(method, url, headers=headers, data=body, timeout=30)
        assert (r.status_code, r.json()) == (403, {"status": "This TorchServe instance only accepts HTTPS requests"}), url


def test_a_client_without_the_ca_fails_the_handshake(https_server, tls, monkeypatch, other_bundles):
    url = https_server.inference_url + "/ping"
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(url, headers=https_server.headers(), timeout=10)  # the variables' bundle
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE")
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(url, headers=https_server.headers(), timeout=10)  # requests' own bundle (certifi)
    assert requests.get(url, headers=https_server.headers(), verify=tls.ca_bundle, timeout=10).status_code == 200


def test_client_verify_holds_where_the_ca_bundle_variables_point_elsewhere(https_server, tls, example_model,
                                                                            other_bundles, tmp_path):
    # Why `verify` goes with each request: the variables replace a Session's own verify.
    session = requests.Session()
    session.verify = tls.ca_bundle
    with pytest.raises(requests.exceptions.SSLError):
        session.get(https_server.inference_url + "/ping", headers=https_server.headers(), timeout=10)

    keys = key_file(https_server, tmp_path)
    batch = images(2)
    expected = reference_embeddings(example_model, "conv1", batch)
    with EmbeddingClient(https_server.inference_url, "encoder", key_file=keys, verify=tls.ca_bundle,
                         management_url=https_server.management_url) as client:
        np.testing.assert_allclose(client.embed(batch), expected, atol=1e-5)
        assert client.describe()["layer_name"] == "conv1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        with EmbeddingClient(https_server.inference_url, "encoder", key_file=keys, verify=False) as client:
            np.testing.assert_allclose(client.embed(batch), expected, atol=1e-5)
    for refused in (EmbeddingClient(https_server.inference_url, "encoder", key_file=keys, verify=True),
                    EmbeddingClient(https_server.inference_url, "encoder", key_file=keys)):  # the default: True
        with refused, pytest.raises(EmbeddingError, match="TLS handshake failed with verify=True.*"
                                                          "CERTIFICATE_VERIFY_FAILED.*verify= the path"):
            refused.embed(batch)


def test_the_client_over_grpc_with_tls(https_server, tls, example_model, other_bundles):
    """grpcs:// checks TorchServe's gRPC certificate (`enable_grpc_ssl`) against verify=, as https://
    does; without the CA the handshake fails at once, named, and is not retried; plaintext gets nothing."""
    target = f"127.0.0.1:{https_server.ports['grpc_inference_port']}"
    batch = images(3)
    client = EmbeddingClient(f"grpcs://{target}", "encoder", token=https_server.keys["inference"], verify=tls.ca_bundle)
    np.testing.assert_allclose(client.embed(batch), reference_embeddings(example_model, "conv1", batch), atol=1e-4)
    untrusting = EmbeddingClient(f"grpcs://{target}", "encoder", token=https_server.keys["inference"])
    with pytest.raises(EmbeddingError, match="TLS handshake failed with verify=True"):
        untrusting.embed(batch)
    assert untrusting.retried == 0
    with pytest.raises(EmbeddingError, match="gRPC UNAVAILABLE"):
        EmbeddingClient(f"grpc://{target}", "encoder", token=https_server.keys["inference"], retries=0).embed(batch)
    with pytest.raises(ValueError, match="CA's PEM file"):
        EmbeddingClient(f"grpcs://{target}", "encoder", verify=False)


def test_client_refuses_a_ca_bundle_that_is_not_there(tmp_path):
    missing = str(tmp_path / "no-such-ca.pem")
    with pytest.raises(FileNotFoundError, match=re.escape(f"verify={missing!r}: no such CA bundle")):
        EmbeddingClient("https://127.0.0.1:1", "encoder", token="t", verify=missing)
    with pytest.raises(TypeError, match="verify is a int; expected True, False or the path of a CA bundle"):
        EmbeddingClient("https://127.0.0.1:1", "encoder", token="t", verify=1)


def test_embed_script_with_ca_bundle(https_server, tls, example_model, other_bundles, tmp_path, capsys):
    batch = images(3, count=5)
    np.save(tmp_path / "batch.npy", batch)
    keys = key_file(https_server, tmp_path)
    common = [str(tmp_path / "batch.npy"), "--url", https_server.inference_url, "--key-file", keys, "--quiet",
              "--batch-size", "2"]
    assert embed.main([*common, "--out", str(tmp_path / "out"), "--ca-bundle", tls.ca_bundle]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out" / "embeddings.npy"),
                               reference_embeddings(example_model, "conv1", batch), atol=1e-5)

    assert embed.main([*common, "--out", str(tmp_path / "untrusted"), "--retries", "0"]) == 1
    assert "TLS handshake failed" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:  # refused before anything is written or sent
        embed.main([*common, "--out", str(tmp_path / "missing"), "--ca-bundle", str(tmp_path / "no-such-ca.pem")])
    assert exit_.value.code == 2 and not (tmp_path / "missing").exists()
    err = capsys.readouterr().err
    assert "--ca-bundle" in err and "does not exist" in err


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, timeout=60)


def test_probe_with_ca_bundle(https_server, tls, other_bundles, tmp_path):
    keys = key_file(https_server, tmp_path)
    ready = ["ready", "--url", https_server.inference_url, "--management-url", https_server.management_url,
             "--key-file", keys]
    result = probe(*ready, "--ca-bundle", tls.ca_bundle)
    assert result.returncode == 0 and "model encoder: 1 READY worker" in result.stdout, result.stderr
    result = probe(*ready)  # the system's trust store: the private CA is not in it
    assert result.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in result.stderr
    result = probe("live", "--url", https_server.inference_url, "--key-file", keys)
    assert result.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in result.stderr
    result = probe(*ready, "--ca-bundle", str(tmp_path / "no-such-ca.pem"))
    assert result.returncode == 2 and "--ca-bundle" in result.stderr and "does not exist" in result.stderr


def test_the_documented_config_is_the_one_served(https_server, tmp_path):
    """The HTTPS lines of docs/security.md are the ones this server runs with, but for ports and paths."""
    block = next(b for b in doc_blocks() if b.language == "properties")
    (tmp_path / "documented.properties").write_text(block.text)
    documented = read_properties(str(tmp_path / "documented.properties"))
    served = read_properties(https_server.config_path)
    assert set(documented) == set(PORT_KEYS + TLS_KEYS + ("enable_grpc_ssl",))
    assert documented["enable_grpc_ssl"] == served["enable_grpc_ssl"] == "true"
    for key in PORT_KEYS:
        assert documented[key] == f"https://127.0.0.1:{DOC_PORTS[key]}"
        assert served[key] == f"https://127.0.0.1:{https_server.ports[key]}"
    for key in TLS_KEYS:
        assert os.path.basename(documented[key]) == os.path.basename(served[key])


def test_the_https_blocks_of_the_docs_run_against_it(https_server, tls, other_bundles, tmp_path, monkeypatch):
    """docs/security.md's `https` blocks, in order, in one bash session as tests/test_docs.py runs the others:
    its ports become this server's, out/tls/ca.pem is this test's CA, key_file.json this server's."""
    blocks = [b for b in all_blocks() if "https" in b.flags]
    assert blocks and {b.path for b in blocks} == {DOC}
    ports = {doc: https_server.ports[key] for key, doc in DOC_PORTS.items()}
    blocks = [dataclasses.replace(b, text=re.sub(r"\b(127\.0\.0\.1|localhost):(8443|8444|8445)\b",
                                                 lambda m: f"{m.group(1)}:{ports[m.group(2)]}", b.text))
              for b in blocks]
    scratch = tmp_path / "repo"
    (scratch / "out" / "tls").mkdir(parents=True)
    for name in (".venv", "scripts", "examples", "deploy"):
        os.symlink(os.path.realpath(os.path.join(REPO, name)), scratch / name)
    shutil.copy(tls.ca_bundle, scratch / "out" / "tls" / "ca.pem")
    key_file(https_server, scratch)
    monkeypatch.setenv("TOKEN", https_server.keys["inference"])
    monkeypatch.setenv("MTOKEN", https_server.keys["management"])
    output = run_session(blocks, tmp_path, free_ports(5), str(scratch), timeout=240)
    assert "without --cacert: curl exit status 60" in output and "(1, 10)" in output
    assert "only accepts HTTPS requests" in output and "HTTP 403" in output
    assert np.load(scratch / "out" / "tls_embedded" / "embeddings.npy").shape == (3, 10)


def test_the_documented_openssl_recipe_makes_a_certificate_torchserve_serves(model_store, tmp_path):
    """The first block of the HTTPS section (openssl), run as written; TorchServe serves what it makes."""
    recipe = next(b for b in doc_blocks() if b.language == "bash" and "openssl req" in b.text)
    subprocess.run(["bash", "-euo", "pipefail", "-c", recipe.text], cwd=tmp_path, check=True, capture_output=True,
                   timeout=120)
    folder = tmp_path / "out" / "tls"
    assert (folder / "server.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    made = ServerTls(str(folder / "server.pem"), str(folder / "server.key"), str(folder / "ca.pem"))
    with TorchServe(model_store, tls=made) as server:  # no model: the frontend's TLS is what is checked
        r = requests.get(server.inference_url.replace("127.0.0.1", "localhost") + "/ping", headers=server.headers(),
                         verify=made.ca_bundle, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "Healthy"


def test_an_ec_key_stops_torchserve_at_start(model_store, tmp_path):
    """TorchServe 0.12 reads the key as RSA only (docs/security.md#https says so): an EC key ends its start."""
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    (tmp_path / "server.key").write_bytes(pkcs8(leaf.private_key_pem.bytes()))
    server = TorchServe(model_store, tls=ServerTls(str(tmp_path / "server.pem"), str(tmp_path / "server.key"),
                                                   str(tmp_path / "ca.pem")))
    try:
        with pytest.raises(RuntimeError, match=r"(?s)torchserve exited.*Invalid RSA private key"):
            server.start(timeout=60)
    finally:
        server.cleanup()
