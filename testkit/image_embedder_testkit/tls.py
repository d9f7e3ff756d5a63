"""A private CA and a server certificate for 127.0.0.1/localhost, made with trustme, as TorchServe reads them."""
from __future__ import annotations

import os

import trustme
from cryptography.hazmat.primitives import serialization

from image_embedder_testkit.ts_server import ServerTls


def pkcs8(key_pem: bytes) -> bytes:
    """An unencrypted PEM key as PKCS#8 (`BEGIN PRIVATE KEY`), the form `openssl req -noenc` writes."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_server_tls(folder: str, organization: str = "image-embedder test CA") -> ServerTls:
    """ca.pem, server.pem and server.key in `folder`: RSA keys, because TorchServe 0.12 reads only RSA
    keys and offers only ECDHE-RSA ciphers."""
    ca = trustme.CA(organization_name=organization, key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, name) for name in ("ca.pem", "server.pem", "server.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    with open(paths["server.pem"], "wb") as f:
        f.writelines(blob.bytes() for blob in leaf.cert_chain_pems)
    with open(paths["server.key"], "wb") as f:
        f.write(pkcs8(leaf.private_key_pem.bytes()))
    return ServerTls(paths["server.pem"], paths["server.key"], paths["ca.pem"])
