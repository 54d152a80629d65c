"""``fedmoe deploy init``: key material in the formats Flower 1.42 reads, never overwritten
without --force, clear errors for a folder that cannot be used."""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from fedmoe.cli import main
from fedmoe.deploy import DeployError, init_deployment


def test_key_material_is_what_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    layout = init_deployment(tmp_path / "d", hosts=["fl.example.org", "10.0.0.5", "::1"],
                             nodes=2, port=9443)
    # SuperNode keys: what flower-supernode (load_ssh_private_key, EC) and
    # `flwr supernode register` (its own loader: OpenSSH public key, NIST curve) accept
    for i in range(2):
        private = load_ssh_private_key(layout.node_key(i).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(
            private.public_key())
        assert try_load_public_key(layout.node_pub(i)) == public_key_to_bytes(
            private.public_key())
        assert stat.S_IMODE(layout.node_key(i).stat().st_mode) == 0o600
    assert layout.node_pub(0).read_bytes() != layout.node_pub(1).read_bytes()
    # the SuperLink certificate: signed by the CA, SANs for every host
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("::1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(layout.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert stat.S_IMODE(layout.server_key.stat().st_mode) == 0o600
    # the connection entry Flower's config reader takes
    from flwr.cli.flower_config import parse_superlink_connection

    entry = tomllib.loads(layout.connection.read_text())["superlink"]["fedmoe"]
    connection = parse_superlink_connection(entry, "fedmoe")
    assert connection.address == "fl.example.org:9443"
    assert connection.root_certificates == str(layout.ca_cert)


def test_public_key_matches_private_key(tmp_path):
    from cryptography.hazmat.primitives import serialization

    layout = init_deployment(tmp_path, nodes=1)
    private = load_ssh_private_key(layout.node_key(0).read_bytes(), password=None)
    expected = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
    assert layout.node_pub(0).read_bytes().strip() == expected


def test_never_overwrites_without_force(tmp_path):
    layout = init_deployment(tmp_path / "d", nodes=2)
    before = {p: p.read_bytes() for p in layout.files()}
    with pytest.raises(DeployError, match="complete set of key material.*--force"):
        init_deployment(tmp_path / "d", nodes=2)
    assert {p: p.read_bytes() for p in layout.files()} == before  # untouched
    # a different node count is still "part of a set": refused, named
    with pytest.raises(DeployError, match="part of a set"):
        init_deployment(tmp_path / "d", nodes=3)
    with pytest.raises(DeployError, match="other nodes: node-1"):
        init_deployment(tmp_path / "d", nodes=1)
    again = init_deployment(tmp_path / "d", nodes=2, force=True)
    assert again.ca_cert.read_bytes() != before[layout.ca_cert]
    assert again.node_key(1).read_bytes() != before[layout.node_key(1)]
    init_deployment(tmp_path / "d", nodes=1, force=True)  # the old node-1 goes with its set
    assert not layout.node_key(1).parent.exists()
    with pytest.raises(DeployError, match="complete set"):
        init_deployment(tmp_path / "d", nodes=1)


def test_partial_file_or_unusable_folder_is_refused(tmp_path, monkeypatch, capsys):
    partial = tmp_path / "partial"
    (partial / "superlink").mkdir(parents=True)
    (partial / "superlink" / "server.key").write_text("old key")
    with pytest.raises(DeployError, match=r"part of a set of key material \(superlink/server.key"):
        init_deployment(partial)
    assert (partial / "superlink" / "server.key").read_text() == "old key"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DeployError, match="is a file"):
        init_deployment(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    init_deployment(empty, nodes=1)  # an empty folder is fine

    def denied(path):
        raise PermissionError(13, "Permission denied")

    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    monkeypatch.setattr(os, "listdir", denied)  # (chmod does not stop root)
    with pytest.raises(DeployError, match="unreadable: cannot be read"):
        init_deployment(unreadable)
    monkeypatch.undo()
    # the CLI: exit 2 with the message
    assert main(["deploy", "init", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    for bad in (["--nodes", "0"], ["--hosts", "bad host!"], ["--port", "70000"]):
        assert main(["deploy", "init", str(tmp_path / "new"), *bad]) == 2
        assert "error" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["deploy", "init", str(tmp_path / "new"), "--nodes", "1"]) == 0
