"""CURVE key pairs for a remote engine, made and read with pyzmq's own zmq.auth.

One folder (platformdirs' user config dir by default) holds:
  server.key, server.key_secret   the engine's pair; server.key (public) goes to every client
  NAME.key, NAME.key_secret       a client's pair; both go to that client's machine
  allowed/NAME.key                the public keys the engine lets in
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from engine.shared.client import default_key_dir

SERVER = "server"
ALLOWED = "allowed"


@dataclass(frozen=True)
class CurveKeys:
    public: bytes  # the server's key pair (Z85)
    secret: bytes
    allowed_dir: Path  # public certificates of the clients allowed to connect


def create(folder: Path, client: str = "client") -> list[Path]:
    """Make the server pair (once) and a client pair allowed in; returns the files written."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", client) or client == SERVER:
        raise ValueError(f"a client key name is letters, digits, _ or - (not {SERVER!r})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ALLOWED).mkdir(exist_ok=True)
    written = []
    for name in (SERVER, client):
        if (folder / f"{name}.key_secret").exists():
            continue  # never replace a key pair: clients already hold its public half
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    allowed = folder / ALLOWED / f"{client}.key"
    if not allowed.exists():
        shutil.copy(folder / f"{client}.key", allowed)
        written.append(allowed)
    return written


def load_server_keys(folder: Path) -> CurveKeys:
    secret_file = folder / f"{SERVER}.key_secret"
    if not secret_file.is_file():
        raise ValueError(
            f"no engine key pair in {folder}: create one with `python -m engine keys --dir "
            f"{folder}` (a remote or CURVE engine needs it; see docs/protocol.md)"
        )
    public, secret = zmq.auth.load_certificate(secret_file)
    return CurveKeys(public, secret, folder / ALLOWED)


def main(args) -> int:
    """`python -m engine keys`: create the key pairs and say where each file goes."""
    folder = Path(args.dir).expanduser() if args.dir else default_key_dir()
    written = create(folder, args.client)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{folder} already holds the keys for {args.client!r}")
    print(
        f"engine: serve with --keys {folder} (it reads {SERVER}.key_secret and {ALLOWED}/).\n"
        f"client: copy {folder / (args.client + '.key')}, {folder / (args.client + '.key_secret')} "
        f"and {folder / (SERVER + '.key')} (public) to the client's key folder."
    )
    return 0
