"""`mmfuse-keys`: CURVE certificates for a lab, in ZeroMQ's format (pyzmq's zmq.auth).

  mmfuse-keys new daemon --dir keys          the daemon's: keys/daemon.key and keys/daemon.key_secret
  mmfuse-keys new cam0 --dir keys/sensors    a sensor's: hand cam0.key_secret to the sensor, keep cam0.key
  mmfuse-keys list keys/sensors              names and public keys

NAME.key holds the public key and may be shared; NAME.key_secret holds the secret key too and is written
readable by its owner only (mode 0600). The daemon refuses a secret key that every user can read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mmfuse.security import SecurityError, read_certificate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="write NAME.key and NAME.key_secret")
    new.add_argument("name", help="whose certificate: a sensor's name, 'daemon', a consumer's name")
    new.add_argument("--dir", required=True, type=Path, help="where to write them (made if missing)")
    listing = commands.add_parser("list", help="print the name and public key of each certificate in a directory")
    listing.add_argument("dir", type=Path)
    return parser.parse_args(argv)


def new_certificate(name: str, directory: Path) -> tuple[Path, Path]:
    import zmq.auth

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise SecurityError(f"{name!r} is not a usable name: up to 64 letters, digits, '-' or '_', such as cam0")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if os.path.lexists(p)]  # a dangling link counts: never written through
    if existing:
        raise SecurityError(f"{' and '.join(existing)} already exist; remove them first or choose another name "
                            f"(a new key locks out whoever holds the old one)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0o077)  # the secret is never readable by others, not even for a moment
        try:
            zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(umask)
    except OSError as exc:
        raise SecurityError(f"cannot write keys in {directory}: {exc.strerror or exc}; --dir takes a directory "
                            f"you can write to (made if missing)") from None
    public.chmod(0o644)
    secret.chmod(0o600)
    return public, secret


def list_certificates(directory: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """(name, public key, whether its secret is here) of each certificate in a directory, and why each file
    that looks like one (by its name) could not be read."""
    if not directory.is_dir():
        raise SecurityError(f"{directory}: no such directory")
    names = sorted({p.name.removesuffix("_secret").removesuffix(".key") for p in directory.glob("*.key*")
                    if p.suffix in (".key", ".key_secret")})
    found, unreadable = [], []
    for name in names:
        secret = directory / f"{name}.key_secret"
        path = directory / f"{name}.key" if (directory / f"{name}.key").is_file() else secret
        try:
            found.append((name, read_certificate(path).public.decode(), secret.is_file()))
        except SecurityError as exc:
            unreadable.append(str(exc))
    return found, unreadable


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "new":
            public, secret = new_certificate(args.name, args.dir)
            print(f"wrote {public} (public: share it) and {secret} (secret, mode 0600: give it to {args.name} "
                  f"only)\npublic key: {read_certificate(public).public.decode()}")
            return 0
        rows, unreadable = list_certificates(args.dir)
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows and not unreadable:
        print(f"{args.dir}: no certificates", file=sys.stderr)
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, key, has_secret in rows:
        print(f"{name:<{width}}  {key}" + ("  (secret here)" if has_secret else ""))
    for problem in unreadable:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
