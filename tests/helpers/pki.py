"""A private CA and server certificates made with ``openssl`` (the remote-host TLS tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=60)


def make_ca(folder: Path, name: str = "ca") -> Path:
    """`folder/NAME.pem` (and its key): a self-signed CA valid two days."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=mailferry test {name}",
             cwd=folder)
    return folder / f"{name}.pem"


def server_cert(ca: Path, name: str, san: str) -> tuple[Path, Path]:
    """(cert, key) for `san` ("IP:10.77.1.2,DNS:mail1.example"), signed by `ca`, beside it."""
    folder = ca.parent
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr",
                           folder / f"{name}.pem", folder / f"{name}.ext")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca.with_suffix(".key"),
             "-CAcreateserial", "-days", "2", "-out", cert, "-extfile", ext, cwd=folder)
    key.chmod(0o600)
    return cert, key
