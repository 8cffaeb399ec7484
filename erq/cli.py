"""Command line: ``erq serve`` (the default), ``erq stats``, ``erq journal dump|check|pack``,
``erq example-config``, ``erq bench``."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (default: $ERQ_CONFIG; without either, the embedded "
        "defaults)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, help="memcache-protocol port (default 22133)")
    p.add_argument(
        "--admin-port", type=int, dest="admin_port", help="admin HTTP port (default 2223; 0 = off)"
    )
    p.add_argument(
        "--data-dir", "-d", dest="data_dir", help="journal directory (default ./erq-data)"
    )
    p.add_argument("--compat", choices=("erq", "kestrel"), help="wire compatibility mode")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="DEBUG, INFO (default), WARNING or ERROR",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erq",
        description="erq: a durable Kestrel-compatible queue server",
        epilog="erq with no command, or with serve's options, runs 'erq serve'; "
        "'erq serve --help' lists them (--host, --port, --data-dir, --config, ...).",
    )
    parser.add_argument(
        "--version", action="version", version=f"erq {__version__} ({_implementation()})"
    )
    sub = parser.add_subparsers(dest="command")
    _serve_args(
        sub.add_parser(
            "serve",
            help="run the server (default)",
            description="Run the server. Its flags override the ERQ_<KEY> environment "
            "variables (ERQ_HOST, ERQ_PORT, ...), which override the configuration file.",
        )
    )
    stats = sub.add_parser(
        "stats",
        help="print a running server's stats (found as erq serve would listen: flags, then "
        "ERQ_HOST / ERQ_PORT, then the configuration file)",
    )
    stats.add_argument("--config", "-c", help="the server's TOML configuration file")
    stats.add_argument("--host", help="default 127.0.0.1")
    stats.add_argument("--port", "-p", help="default 22133")
    journal = sub.add_parser(
        "journal",
        help="journal tools: dump and check only read (a running server's directory too); "
        "pack needs the server stopped",
    )
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    jsub.add_parser("dump", help="print every record of one queue's journal").add_argument(
        "queue_dir"
    )
    jsub.add_parser("check", help="verify every journal; non-zero exit on damage").add_argument(
        "data_dir"
    )
    jsub.add_parser(
        "pack",
        help="compact every journal of a stopped server (or one queue's directory); "
        "exit 1 if one had damage (repaired as a start does) or could not be packed, 2 if "
        "nothing could be done (a server holds the directory, or it cannot be read)",
    ).add_argument("data_dir")
    sub.add_parser(
        "example-config",
        help="print a configuration file with every setting at its default, each explained",
    )
    # Listed here for ``erq --help``; its options are parsed by erq.bench, which main() imports
    # only for it (the server does not carry the load generator's modules).
    sub.add_parser(
        "bench",
        help="measure a server and check its replies (starts its own unless --host/--port)",
        add_help=False,
    )
    return parser


def _implementation() -> str:
    from ._compat import IMPLEMENTATION

    return IMPLEMENTATION


def _serving(argv: list[str]) -> bool:
    """Whether ``argv`` runs the server (its default command), told before parsing it."""
    if not argv:
        return True
    first = argv[0]
    return first == "serve" or first.startswith("-") and first not in ("-h", "--help", "--version")


def _serve(ns: argparse.Namespace) -> int:
    import faulthandler
    import logging

    from .config import ConfigError, load_config
    from .server import run

    logging.basicConfig(
        level=getattr(logging, ns.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A fatal signal (SIGSEGV; SIGBUS, from a mapped journal segment truncated under the
    # server) would end the process with nothing in its log: the log gets its stacks.
    faulthandler.enable()
    cli = {k: getattr(ns, k) for k in ("host", "port", "admin_port", "data_dir", "compat")}
    try:
        config = load_config(ns.config, cli=cli)
    except ConfigError as exc:
        print(f"erq: bad configuration: {exc}", file=sys.stderr)
        return 2
    return run(config, cli)


def _stats(ns: argparse.Namespace) -> int:
    """The ``stats`` reply, one STAT line each; 1 if there is no server or not a whole reply."""
    import socket

    from .config import ConfigError, load_config

    # With both flags, where to look is said in full: a broken $ERQ_CONFIG or ERQ_PORT (one
    # meant for another server, say) must not stop the look.
    env = {} if ns.host and ns.port and not ns.config else None
    try:
        server = load_config(ns.config, cli={"host": ns.host, "port": ns.port}, env=env).server
    except ConfigError as exc:
        print(f"erq stats: bad configuration: {exc}", file=sys.stderr)
        return 2
    where = f"{server.host}:{server.port}"
    buf = b""
    try:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"stats\r\n")
            while not (buf.endswith(b"\r\nEND\r\n") or buf == b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        print(f"erq stats: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    lines = buf.decode("utf-8", "replace").split("\r\n")
    if lines[-2:] != ["END", ""] or not all(line.startswith("STAT ") for line in lines[:-2]):
        print(f"erq stats: {where}: not a stats reply: {buf[:200]!r}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(line + "\n" for line in lines[:-2]))
    return 0


def _example_config() -> int:
    """The example file travels in the package: a wheel's users have no checkout to copy it from."""
    from importlib.resources import files

    sys.stdout.write(files(__package__).joinpath("example.toml").read_text(encoding="utf-8"))
    return 0


def _journal(ns: argparse.Namespace) -> int:
    from .journal import tool

    out, err = sys.stdout, sys.stderr
    try:
        if ns.journal_command == "dump":
            return tool.dump(ns.queue_dir, out, err)
        if ns.journal_command == "check":
            return tool.check(ns.data_dir, out, err)
        return tool.pack(ns.data_dir, out, err)
    except BrokenPipeError:
        raise  # the reader of the output is gone (main ends quietly)
    except OSError as exc:  # cannot read a file or a directory at all (permissions, say)
        where = f"{exc.filename}: " if exc.filename else ""
        err.write(f"erq journal {ns.journal_command}: {where}{exc.strerror or exc}\n")
        return 2  # the tool could not do its work: not a verdict on the journal


def main(argv: list[str] | None = None) -> int:
    if _serving(sys.argv[1:] if argv is None else argv):
        from . import startsignals

        startsignals.hold()  # first: the server replays these once its loop handles them
    try:
        return _main(argv)
    except BrokenPipeError:  # erq journal dump DIR | head: the reader is gone, not an error
        # Python's advice: point stdout at /dev/null, so the final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(bench.build_parser().parse_args(argv[1:]))
    parser = build_parser()
    if _serving(argv) and argv[:1] != ["serve"]:
        argv.insert(0, "serve")
    ns = parser.parse_args(argv)
    if ns.command == "stats":
        return _stats(ns)
    if ns.command == "journal":
        return _journal(ns)
    if ns.command == "example-config":
        return _example_config()
    return _serve(ns)
