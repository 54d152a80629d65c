"""Key material for a real deployment on Flower's own runtime (``fedmoe deploy init``).

One folder holds everything a SuperLink and its SuperNodes need for TLS and node
authentication (docs/deployment.md has the commands that use it)::

    DIR/ca.crt                     the deployment's own CA (every SuperNode and `flwr` trusts it)
    DIR/ca.key                     the CA's private key (keep it offline; only init uses it)
    DIR/superlink/server.crt       the SuperLink's TLS certificate, signed by the CA, with a
    DIR/superlink/server.key       subject-alternative name for every --hosts entry
    DIR/supernodes/node-<i>/node.key  SuperNode i's authentication key: EC P-384, OpenSSH
    DIR/supernodes/node-<i>/node.pub  format (what `flower-supernode
                                      --auth-supernode-private-key` and `flwr supernode
                                      register` read)
    DIR/flwr-config.toml           a `[superlink.<name>]` connection entry to append to
                                   $FLWR_HOME/config.toml (address and root-certificates)

Private keys are written with mode 0600. Existing key material is never overwritten
without ``force``; a folder holding only part of the set, or that cannot be read, is an
error that says what is there and what to do.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedmoe.config import ConfigError

#: Files of a complete set besides the per-node ones (relative to DIR).
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink/server.crt", "superlink/server.key"
CONNECTION = "flwr-config.toml"
#: The SuperLink's one HTTP port (Fleet, Control and ServerApp APIs), Flower's default.
DEFAULT_PORT = 8000
#: Certificates are valid this long.
VALID_DAYS = 825
MAX_NODES = 1000


class DeployError(ConfigError):
    """The deployment folder or the arguments cannot be used; the message says the fix."""


@dataclass(frozen=True)
class Deployment:
    """Paths of a deployment folder's key material."""

    root: Path
    nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def connection(self) -> Path:
        return self.root / CONNECTION

    def node_key(self, i: int) -> Path:
        return self.root / "supernodes" / f"node-{i}" / "node.key"

    def node_pub(self, i: int) -> Path:
        return self.root / "supernodes" / f"node-{i}" / "node.pub"

    def files(self) -> list[Path]:
        """Every file of the complete set."""
        return [self.root / CA_CERT, self.root / CA_KEY, self.server_cert, self.server_key,
                self.connection, *(p for i in range(self.nodes)
                                   for p in (self.node_key(i), self.node_pub(i)))]


def init_deployment(root: str | Path, *, hosts: list[str] | None = None, nodes: int = 3,
                    port: int = DEFAULT_PORT, name: str = "fedmoe",
                    force: bool = False) -> Deployment:
    """Create the CA, the SuperLink's certificate and key, ``nodes`` SuperNode key pairs
    and a connection entry in ``root``.

    Parameters
    ----------
    root : path
        The deployment folder; created if missing.
    hosts : list of str (default: ["localhost", "127.0.0.1"])
        Names and IP addresses the SuperLink is reached at: each goes into the
        certificate's subject-alternative names (IPs as IP entries, names as DNS entries);
        the first is the connection entry's address.
    nodes : int (default: 3)
        SuperNode key pairs, in ``supernodes/node-0`` ... ``node-<nodes-1>``.
    port : int (default: 8000)
        The SuperLink's port, for the connection entry.
    name : str (default: "fedmoe")
        The connection's name (``flwr run . <name>``).
    force : bool (default: False)
        Replace existing key material (a new CA: every node must get the new ``ca.crt``
        and re-register its new key); node folders beyond ``nodes`` are removed.

    Raises
    ------
    DeployError
        For a bad argument, or a folder that is a file, cannot be read or written, or
        already holds key material (all or part of a set) and ``force`` is not given.
    """
    hosts = list(hosts or ["localhost", "127.0.0.1"])
    _check_arguments(hosts, nodes, port, name)
    layout = Deployment(Path(root).expanduser().resolve(), nodes)
    _check_folder(layout, force)
    for stale in _other_nodes(layout):  # --force: keys of the replaced set, beyond --nodes
        shutil.rmtree(layout.root / "supernodes" / stale)
    ca_key, ca_cert = _make_ca()
    server_key, server_cert = _make_server(ca_key, ca_cert, hosts)
    _write(layout.root / CA_KEY, _pem_key(ca_key), private=True)
    _write(layout.ca_cert, _pem_cert(ca_cert))
    _write(layout.server_key, _pem_key(server_key), private=True)
    _write(layout.server_cert, _pem_cert(server_cert))
    for i in range(nodes):
        private, public = _node_key_pair()
        _write(layout.node_key(i), private, private=True)
        _write(layout.node_pub(i), public)
    address = f"[{hosts[0]}]:{port}" if _is_ipv6(hosts[0]) else f"{hosts[0]}:{port}"
    _write(layout.connection, (
        f"# Append to $FLWR_HOME/config.toml (default ~/.flwr/config.toml), then\n"
        f"#   flwr run . {name}\n"
        f"[superlink.{name}]\n"
        f"address = \"{address}\"\n"
        f"root-certificates = \"{layout.ca_cert}\"\n").encode())
    return layout


def _check_arguments(hosts: list[str], nodes: int, port: int, name: str) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise DeployError(f"--nodes must be in [1, {MAX_NODES}], got {nodes}")
    if not 1 <= port <= 65535:
        raise DeployError(f"--port must be in [1, 65535], got {port}")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise DeployError(f"--name {name!r}: use letters, digits, '-' and '_' only")
    for host in hosts:
        if _is_ip(host):
            continue
        labels = host.rstrip(".").split(".")
        if not host or len(host) > 253 or not all(
                label and len(label) <= 63 and label.replace("-", "").isalnum()
                and not label.startswith("-") and not label.endswith("-") for label in labels):
            raise DeployError(f"--hosts {host!r} is neither an IP address nor a DNS name "
                              "(letters, digits and '-' in dot-separated labels)")


def _check_folder(layout: Deployment, force: bool) -> None:
    root = layout.root
    if root.exists() and not root.is_dir():
        raise DeployError(f"{root}: is a file, not a folder; choose another DIR")
    if root.is_dir():
        try:
            present = [p for p in layout.files() if p.exists()]
            extra = _other_nodes(layout)
            os.listdir(root)
        except PermissionError as err:
            raise DeployError(f"{root}: cannot be read ({err.strerror}); fix its permissions "
                              "or choose another DIR") from None
        if (present or extra) and not force:
            complete = len(present) == len(layout.files()) and not extra
            what = ("a complete set of key material" if complete else
                    "part of a set of key material (" + ", ".join(
                        str(p.relative_to(root)) for p in present[:6])
                    + (", ..." if len(present) > 6 else "") + (
                        f"; other nodes: {', '.join(extra)}" if extra else "") + ")")
            raise DeployError(
                f"{root}: already holds {what}; fedmoe never overwrites keys. Use it as it "
                "is, choose another DIR, or pass --force to replace all of it (a new CA: "
                "every SuperNode then needs the new ca.crt and its new key registered)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".fedmoe-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DeployError(f"{root}: cannot be written ({err.strerror}); fix its permissions "
                          "or choose another DIR") from None


def _other_nodes(layout: Deployment) -> list[str]:
    """Node folders in ``supernodes/`` beyond ``layout.nodes`` (an earlier, larger set)."""
    keep = {layout.node_key(i).parent.name for i in range(layout.nodes)}
    return sorted(p.name for p in (layout.root / "supernodes").glob("node-*")
                  if p.is_dir() and p.name not in keep)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).version == 6


def _make_ca():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe deployment CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server(ca_key, ca_cert, hosts: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
             for h in hosts]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _node_key_pair() -> tuple[bytes, bytes]:
    """A SuperNode's authentication key pair, EC P-384 in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` (mode 0600 for a private key), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
