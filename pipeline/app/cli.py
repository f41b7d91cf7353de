"""The ``sluice`` command.

Exit codes:
  0    every recipient settled, none unknown or deferred
  1    an unexpected error (a bug: please report it)
  2    a bad campaign file, option, source or run directory; nothing was sent (or, past
       [limits] max_reject_ratio, nothing more)
  3    finished, but some recipients are unknown or deferred (see ``sluice status``)
  4    stopped early: the provider refused the whole request (credentials,
       balance, template...), its TLS certificate was not accepted, or it could
       not be connected to; pending recipients are sent by a resume
  130  stopped by SIGINT, 143 by SIGTERM, after flushing the ledger
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from pipeline.app.exits import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_USAGE,
)
from pipeline.app.run_commands import cmd_demo, cmd_resume, cmd_run
from pipeline.app.worker_command import add_worker_parser
from pipeline.errors import (
    CampaignError,
    RunDirError,
    RunStopped,
    SluiceError,
    SourceError,
)
from pipeline.scale import is_limiter_url

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("build_parser", "main")


def _operator_command(name: str) -> Callable[[argparse.Namespace, Console], int]:
    """An operator command, imported when it runs: `sluice run` loads none of their modules."""

    def command(args: argparse.Namespace, console: Console) -> int:
        from pipeline.app import ops_commands

        run: Callable[[argparse.Namespace, Console], int] = getattr(ops_commands, name)
        return run(args, console)

    return command


_cmd_export = _operator_command("cmd_export")
_cmd_listen = _operator_command("cmd_listen")
_cmd_receipts = _operator_command("cmd_receipts")
_cmd_reconcile = _operator_command("cmd_reconcile")
_cmd_report = _operator_command("cmd_report")
_cmd_simulate = _operator_command("cmd_simulate")
_cmd_status = _operator_command("cmd_status")


# -- argument parsing ----------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Bulk SMS through provider batch APIs.")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="start (or continue) a campaign")
    r.add_argument("campaign", help="campaign file (TOML)")
    r.add_argument("--run-dir", help="run directory (default: [run] dir of the campaign)")
    r.add_argument("--force", action="store_true", help="continue a run dir of a changed campaign/source")
    r.add_argument(
        "--dry-run", action="store_true", help="render and validate every row, count segments and cost"
    )
    r.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    r.add_argument(
        "--listen", type=int, metavar="PORT", help="run `sluice listen` on PORT for the run's duration"
    )
    r.add_argument(
        "--test-to",
        metavar="PHONE[,PHONE...]",
        help="send the first rendered message to these numbers only, in a run directory of its own",
    )
    r.add_argument("--limiter", type=_limiter_url, help=LIMITER_HELP)
    r.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="send in N shards, a process each (README: Scaling out)",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("resume", help="resume a run after a crash or a stop")
    s.add_argument("run_dir")
    s.add_argument("--resend-unknown", action="store_true", help="send unknown recipients again")
    s.add_argument("--force", action="store_true", help="resume even though the source changed")
    s.add_argument("--limiter", type=_limiter_url, help=LIMITER_HELP)
    s.add_argument(
        "--workers", type=_positive, metavar="N", help="a sharded run: its shard count (the default)"
    )
    s.set_defaults(func=cmd_resume)

    st = sub.add_parser("status", help="where a run stands")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    rc = sub.add_parser("reconcile", help="settle unknown recipients through the provider's status API")
    rc.add_argument("run_dir")
    rc.add_argument(
        "--qps", type=float, default=None, help="status queries per second (default 50; SUBMAIL: 1 a minute)"
    )
    rc.add_argument(
        "--settle-after",
        type=float,
        default=600.0,
        help="seconds after which a send the provider has no record of counts as not sent",
    )
    rc.set_defaults(func=_cmd_reconcile)

    ls = sub.add_parser("listen", help="receive the providers' delivery receipts for a run over HTTP")
    ls.add_argument("run_dir")
    ls.add_argument("--host", default="127.0.0.1")
    ls.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    ls.add_argument("--allow-remote", action="store_true", help="allow a --host beyond loopback")
    ls.add_argument(
        "--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 beyond)"
    )
    ls.add_argument(
        "--subhook-key-env",
        default=None,
        help="environment variable holding the key signed receipt pushes are checked with "
        "(default: the one each provider declares)",
    )
    ls.set_defaults(func=_cmd_listen)

    rr = sub.add_parser("receipts", help="pull delivery receipts from the provider's status API")
    rr.add_argument("run_dir")
    rr.add_argument(
        "--qps", type=float, default=None, help="status queries per second (default 50; SUBMAIL: 1 a minute)"
    )
    rr.add_argument(
        "--settle-after",
        type=float,
        default=600.0,
        help="ask only about recipients sent at least this many seconds ago",
    )
    rr.set_defaults(func=_cmd_receipts)

    rp = sub.add_parser("report", help="an HTML page and PNG charts of a run")
    rp.add_argument("run_dir")
    rp.add_argument("--output", "-o", help="directory (default: RUN_DIR/report)")
    rp.set_defaults(func=_cmd_report)

    ex = sub.add_parser("export", help="the final outcome of every recipient, as CSV or JSONL")
    ex.add_argument("run_dir")
    ex.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    ex.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    ex.set_defaults(func=_cmd_export)

    # Its options are the simulator's own (main() hands them over whole: argparse's REMAINDER
    # would take `sluice simulate --port 0` for options of sluice's).
    sim = sub.add_parser("simulate", help="serve the provider simulator on loopback", add_help=False)
    sim.set_defaults(func=_cmd_simulate, simulator_args=[])

    add_worker_parser(sub)

    d = sub.add_parser("demo", help="a real campaign against the embedded simulator")
    d.add_argument("--recipients", type=_positive, default=100_000)
    d.add_argument("--dir", help="where to put the demo files (default: ./sluice-demo-<time>)")
    d.add_argument("--rps", type=int, default=2000, help="requests per second")
    d.add_argument("--concurrency", type=int, default=64)
    d.add_argument("--latency-ms", type=int, default=20, help="simulated provider latency")
    d.set_defaults(func=cmd_demo)
    return p


def _sluice_error(group: BaseExceptionGroup) -> BaseException:
    """The engine's own error inside a task group's exception group, else the group."""
    matched = group.subgroup(SluiceError)
    while matched is not None and isinstance(matched, BaseExceptionGroup) and len(matched.exceptions) == 1:
        inner = matched.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        matched = inner
    return group


LIMITER_HELP = (
    "share the provider account's requests/s with other runs through this lease limiter: "
    "redis://host:port/db (or unix:/path of a local one)"
)


def _limiter_url(text: str) -> str:
    if not is_limiter_url(text):
        raise argparse.ArgumentTypeError("a limiter is redis://host:port/db or unix:/path")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (package metadata costs ~10 ms a start)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        sys.stdout.write(f"sluice {_version()}\n")  # on stdout, as argparse's own version action
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sluice")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        return _cmd_simulate(argparse.Namespace(simulator_args=argv[1:]), Console(stderr=True))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "json", False) and args.command == "run" and not args.dry_run:
        parser.error("--json goes with --dry-run (a run reports on the terminal; see `sluice status --json`)")
    if args.command == "run" and args.dry_run and args.test_to is not None:
        parser.error("--test-to sends; --dry-run does not: use one of them")
    if args.command == "run" and args.workers is not None and (args.dry_run or args.test_to or args.listen):
        parser.error("--workers goes with neither --dry-run, --test-to nor --listen")
    console = Console(stderr=True)
    try:
        try:
            code: int = args.func(args, console)
        except BaseExceptionGroup as group:
            raise _sluice_error(group) from group
    except CampaignError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    except (RunDirError, SourceError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    except RunStopped as exc:  # before the first send (SUBMAIL's server time): nothing was sent
        console.print(f"[bold red]stopped:[/] {escape(exc.reason)}", soft_wrap=True)
        return EXIT_STOPPED
    except SluiceError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return EXIT_ERROR
    except BrokenPipeError:  # `sluice export RUN | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
