"""The `kvdepot` command: `kvdepot serve ...` runs the server, `kvdepot status` shows it."""

from __future__ import annotations

import argparse
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
    if argv and argv[0] in ("--version", "version"):
        from kvdepot import __version__

        print(f"kvdepot {__version__}")
        return 0
    print(
        "usage: kvdepot serve [--host H] [--port P] [--chunk-size N] [--cpu-buffer-size GB] ...\n"
        "       kvdepot status [--url http://host:8555] [--json]\n"
        "       kvdepot --version\n"
        "Run `kvdepot serve --help` for every server flag.",
        file=sys.stderr,
    )
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
