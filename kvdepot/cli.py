"""The `kvdepot` command: `kvdepot serve ...` runs the server, `kvdepot status` shows it,
`kvdepot keys generate` writes a CURVE key pair."""

from __future__ import annotations

import argparse
import os
import re
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from kvdepot.server.main import main as serve

        return serve(argv[1:], prog="kvdepot serve")
    if argv and argv[0] == "status":
        ap = argparse.ArgumentParser(prog="kvdepot status", description="Show a server's /stats.")
        ap.add_argument("--url", default="http://localhost:8555", help="HTTP endpoint of the server")
        ap.add_argument("--json", action="store_true", help="print raw JSON for scripts")
        args = ap.parse_args(argv[1:])
        from kvdepot.status import run_status

        return run_status(args.url, args.json)
    if argv[:2] == ["keys", "generate"]:
        return generate_keys(argv[2:])
    if argv and argv[0] in ("--version", "version"):
        from kvdepot import __version__

        print(f"kvdepot {__version__}")
        return 0
    print(
        "usage: kvdepot serve [--host H] [--port P] [--chunk-size N] [--cpu-buffer-size GB] ...\n"
        "       kvdepot status [--url http://host:8555] [--json]\n"
        "       kvdepot keys generate DIR [--name NAME]\n"
        "       kvdepot --version\n"
        "Run `kvdepot serve --help` for every server flag.",
        file=sys.stderr,
    )
    return 0 if argv and argv[0] in ("-h", "--help") else 2


def generate_keys(argv: list[str]) -> int:
    """`kvdepot keys generate DIR [--name NAME]`: DIR/NAME.key (the public certificate, to
    hand out) and DIR/NAME.key_secret (the key pair, mode 0600, to keep), in ZeroMQ's
    certificate format. Refuses to replace either file (exit 1, nothing written)."""
    ap = argparse.ArgumentParser(
        prog="kvdepot keys generate",
        description="Write a CURVE key pair: NAME.key (public: give it to the other side) and "
                    "NAME.key_secret (secret, mode 0600: keep it). The server's secret "
                    "certificate goes to --curve-secret-key, its public one to every engine; "
                    "each engine's public certificate goes into the server's "
                    "--curve-allowed-keys directory (docs/security.md).",
    )
    ap.add_argument("dir", metavar="DIR", help="where to write them (created, mode 0700)")
    ap.add_argument("--name", default="kvdepot",
                    help="file name without extension: letters, digits, '.', '_', '-' "
                         "(default %(default)s)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", args.name):
        ap.error(f"--name {args.name!r}: 1-128 letters, digits, '.', '_' or '-', not starting "
                 "with '.'")
    import zmq.auth

    public = os.path.join(args.dir, f"{args.name}.key")
    secret = public + "_secret"
    for path in (public, secret):
        if os.path.lexists(path):
            print(f"kvdepot keys generate: {path} exists; not replaced (remove it first, or "
                  "choose another --name)", file=sys.stderr)
            return 1
    # umask 077 while writing: the secret certificate is never readable by others, not even
    # for the moment between its creation and a chmod.
    old_umask = os.umask(0o077)
    try:
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
    except OSError as exc:
        print(f"kvdepot keys generate: {exc}", file=sys.stderr)
        return 1
    finally:
        os.umask(old_umask)
    os.chmod(public, 0o644)
    key, _ = zmq.auth.load_certificate(public)
    print(f"public certificate: {public}\nsecret certificate: {secret} (mode 0600)\n"
          f"public key: {key.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
