"""Serve private linkage and encrypted cross-tabs to clients over raw TCP.

Each client is served in a child process of its own (up to --max-sessions at
once): whatever a client sends, and even a crash of the native CKKS library on
its bytes, ends only that session, and the server goes on listening. A client
that goes quiet for --idle-timeout seconds is dropped.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import socket
import sys

from protocol.cli import add_input_flags, defaults_beside_script
from protocol.framing import ConnectionClosed, ProtocolError
from protocol.handshake import Refused, ServerPolicy
from protocol.messages import Channel, PeerError
from protocol.records import InputError, parse_mapping
from protocol.server import ServerData, SessionOptions, load_server_data, run_session
from protocol.spec import SpecError, load_spec

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

logger = logging.getLogger("server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="exit codes: 0 done (after --once), 2 bad usage or input, "
        "130 interrupted",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=5050,
        metavar="PORT",
        help="TCP port (0 picks a free one and prints it)",
    )
    add_input_flags(parser, "data/server.csv", "server's", "client")
    parser.add_argument(
        "--group-columns",
        default="state",
        metavar="COL[,COL]",
        help="columns a client may group by",
    )
    parser.add_argument(
        "--value-columns",
        default="age",
        metavar="COL[,COL]",
        help="numeric columns a client may average",
    )
    parser.add_argument(
        "--min-cell-size",
        type=int,
        default=5,
        metavar="K",
        help="refuse a query unless every cell has at least K linked people",
    )
    parser.add_argument(
        "--reveal-counts",
        action="store_true",
        help="return each cell's count as well as its average",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="processes for the linkage, cross-tab and size-check arithmetic",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run that arithmetic on this Ray cluster instead of local "
        "processes (--workers actors)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=2,
        metavar="N",
        help="clients served at the same time; more wait in the queue",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="drop a client that sends nothing for this long when "
        "the server waits on it",
    )
    parser.add_argument(
        "--once", action="store_true", help="serve one client, then exit"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    defaults_beside_script(parser, args, __file__)
    if args.min_cell_size < 1:
        parser.error(
            f"--min-cell-size: expected an integer >= 1, found {args.min_cell_size}"
        )
    if args.workers < 1:
        parser.error(f"--workers: expected an integer >= 1, found {args.workers}")
    if args.max_sessions < 1:
        parser.error(
            f"--max-sessions: expected an integer >= 1, found {args.max_sessions}"
        )
    if not args.idle_timeout > 0:
        parser.error(f"--idle-timeout: expected seconds > 0, found {args.idle_timeout}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0..65535, found {args.port}")
    return args


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def serve_one(
    conn: socket.socket, data: ServerData, options: SessionOptions, idle_timeout: float
) -> int:
    """Child process body: one session, every failure logged and contained."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    conn.settimeout(idle_timeout)
    channel = Channel(conn)
    try:
        outcome = run_session(channel, data, options)
        logger.info("session ended: %s", outcome)
        return 0
    except Refused as exc:
        logger.warning("session refused: %s", exc)
        channel.send_error(str(exc))
    except PeerError as exc:
        logger.warning("client reported an error: %s", exc)
    except ConnectionClosed:
        logger.warning("client closed the connection mid-session")
    except ProtocolError as exc:
        logger.warning("protocol error, closing: %s", exc)
        channel.send_error(str(exc))
    except TimeoutError:
        logger.warning("client idle for %.0f s; closing", idle_timeout)
        channel.send_error(f"no message for {idle_timeout:.0f} s; closing")
    except OSError as exc:
        logger.warning("connection failed: %s", exc)
    except Exception:
        logger.exception("internal error; session closed")
        channel.send_error("internal server error")
    finally:
        conn.close()
    return 1


def _session_process(conn, data, args) -> None:
    options = SessionOptions(args.workers, not args.quiet, args.ray_address)
    sys.exit(serve_one(conn, data, options, args.idle_timeout))


def serve(listener: socket.socket, data: ServerData, args: argparse.Namespace) -> None:
    """Accept clients, each into its own process, at most --max-sessions at once."""
    context = multiprocessing.get_context("fork")
    running: list = []
    try:
        _accept_loop(listener, data, args, context, running)
    finally:
        for child in running:
            child.terminate()
            child.join()


def _accept_loop(listener, data, args, context, running: list) -> None:
    while True:
        while len(running) >= args.max_sessions:
            running[0].join(timeout=0.2)
            running[:] = _reap(running)
        conn, peer = listener.accept()
        logger.info("client connected from %s:%d", *peer[:2])
        child = context.Process(target=_session_process, args=(conn, data, args))
        child.start()
        conn.close()
        running[:] = _reap(running + [child])
        if args.once:
            child.join()
            running[:] = _reap(running)
            return


def _reap(children: list) -> list:
    """Children still running; those that ended are logged if a signal killed them."""
    alive = []
    for child in children:
        if child.is_alive():
            alive.append(child)
            continue
        child.join()
        if child.exitcode is not None and child.exitcode < 0:
            logger.error(
                "session process died with signal %d; still serving", -child.exitcode
            )
    return alive


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s server %(message)s", stream=sys.stderr
    )
    try:
        spec = load_spec(args.spec)
        policy = ServerPolicy(
            _columns(args.group_columns),
            _columns(args.value_columns),
            args.min_cell_size,
            args.reveal_counts,
        )
        data = load_server_data(args.data, spec, parse_mapping(args.columns), policy)
    except (SpecError, InputError) as exc:
        print(f"server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with socket.create_server((args.host, args.port)) as listener:
            logger.info(
                "listening on %s:%d with %d records (spec %s)",
                args.host,
                listener.getsockname()[1],
                len(data.records),
                spec.name,
            )
            serve(listener, data, args)
    except KeyboardInterrupt:
        logger.info("interrupted; exiting")
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(
            f"server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
