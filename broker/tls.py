"""TLS files for the broker, and throwaway development certificates made with the `openssl` CLI.

    certs = make_dev_certs(Path("tls"), clients=["coordinator", "alice"])
    node = LocalNode(Path(".chorus/rabbitmq"), tls=certs.server)   # amqps:// only, client certs required
    open_transport(url, ca_file=certs.ca_file, cert_file=..., key_file=...)

The development CA signs a server certificate for `localhost` and `127.0.0.1`
and one client certificate per user (CN = the user). Its key stays in the
directory next to it, so it is for tests and one-machine demos only: for a
real deployment use your own CA.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from broker.errors import BrokerError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER = "server"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 30


class TlsError(BrokerError):
    """Certificates could not be made, or the files a TLS setup needs are missing."""


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate, and a certificate with its private key (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str = SERVER) -> TlsFiles:
        """`ca.pem`, `NAME.pem` and `NAME.key` in `directory` (absolute paths); all must exist."""
        directory = directory.resolve()
        files = cls(directory / CA_CERT, directory / f"{name}.pem", directory / f"{name}.key")
        missing = [str(p) for p in (files.ca_file, files.cert_file, files.key_file) if not p.is_file()]
        if missing:
            raise TlsError(f"TLS files missing in {directory}: {', '.join(missing)}")
        return files


@dataclass(frozen=True)
class DevCerts:
    directory: Path
    ca_file: Path
    server: TlsFiles
    clients: dict[str, TlsFiles] = field(default_factory=dict)


def make_dev_certs(
    directory: Path,
    clients: Iterable[str] = (),
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
) -> DevCerts:
    """A new CA, a server certificate for `hosts`, and a client certificate per name in `clients`.

    Writes `ca.pem`/`ca.key`, `server.pem`/`server.key` and `NAME.pem`/`NAME.key`
    into `directory` (keys readable by their owner only); existing files are replaced.
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / CA_KEY, directory / CA_CERT
    _openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert), "-days", str(days),
        "-subj", "/O=Chorus/CN=Chorus development CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    ca_key.chmod(0o600)
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    server = _signed(directory, SERVER, hosts[0], "serverAuth", days, f"subjectAltName={sans}")
    made = {name: add_client_cert(directory, name, days=days) for name in clients}
    return DevCerts(directory, ca_cert, server, made)


def add_client_cert(directory: Path, name: str, *, days: int = DEFAULT_DAYS) -> TlsFiles:
    """A client certificate (CN = `name`) signed by the development CA in `directory`."""
    if not name or "/" in name or name.startswith(".") or name in (SERVER, "ca"):
        raise TlsError(f"{name!r} cannot name a client certificate")
    return _signed(directory.resolve(), name, name, "clientAuth", days)


def with_client_files(url: str, files: TlsFiles) -> str:
    """`url` with `cafile`, `certfile` and `keyfile` in its query (as `open_transport` reads them)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(cafile=str(files.ca_file), certfile=str(files.cert_file), keyfile=str(files.key_file))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _signed(directory: Path, name: str, common_name: str, usage: str, days: int, *extra: str) -> TlsFiles:
    ca_key, ca_cert = directory / CA_KEY, directory / CA_CERT
    if not (ca_key.is_file() and ca_cert.is_file()):
        raise TlsError(f"no development CA in {directory} (ca.pem, ca.key); run make_dev_certs first")
    key, cert, csr = directory / f"{name}.key", directory / f"{name}.pem", directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "\n".join(
            [
                "basicConstraints=critical,CA:FALSE",
                "keyUsage=critical,digitalSignature,keyAgreement",
                f"extendedKeyUsage={usage}",
                "subjectKeyIdentifier=hash",
                "authorityKeyIdentifier=keyid",
                *extra,
            ]
        )
        + "\n"
    )
    try:
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/O=Chorus/CN={common_name}",
        )  # fmt: skip
        key.chmod(0o600)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", str(days), "-sha256",
            "-extfile", str(extensions),
        )  # fmt: skip
    finally:
        csr.unlink(missing_ok=True)
        extensions.unlink(missing_ok=True)
    return TlsFiles(ca_cert, cert, key)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("the openssl command is missing; run: apt-get install -y openssl")
    done = subprocess.run([openssl, *args], capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {(done.stderr or done.stdout).strip()[-1000:]}")
