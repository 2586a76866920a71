"""The `credit-engine` command.

  up          the whole system on one machine (embedded Redis and Postgres unless configured)
  serve       the web app only            worker     the arq worker only
  migrate     Alembic migrations to head  reconcile  compare Redis with Postgres, or repair
  orgs        create / show / update an org
  topup       credit an org (Postgres-first)
  verify      check a deployment: schema, scripts, worker, lag, Redis = Postgres (exit 1 on any cross)
  status      balances, live calls, ledger lag and worker health; --watch refreshes like top
  vapi        connect a Vapi account (VAPI_API_KEY): import its numbers, connect them, check them
  audit       audit vapi: compare the ledger with Vapi's own records of calls (exit 1 on a mismatch)

Connection settings come from REDIS_URL and DATABASE_URL; when they are not set, the commands
other than `up` use the servers of a running `credit-engine up` (its <data-dir>/services.json).
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from credit_engine.engine import org_setting_table as table
from credit_engine.engine.config import ConfigError, Settings
from credit_engine.engine.logs import configure_logging

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_FAILED = 1  # a check crossed, or an operation failed for some item (the others were done)
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as a shell reports a tool its reader left


def _connected(settings: Settings) -> Settings:
    if settings.redis_url and settings.database_url:
        return settings
    from credit_engine.engine.services_file import read_services

    services = read_services(settings.data_dir)
    if services is None:
        raise SystemExit(
            "REDIS_URL and DATABASE_URL are not set and no `credit-engine up` is running "
            f"with data dir {settings.data_dir.resolve()} (use --data-dir, or set the URLs)"
        )
    return replace(
        settings,
        redis_url=settings.redis_url or services["redis_url"],
        database_url=settings.database_url or services["database_url"],
    )


def _with_runtime(settings: Settings, action: Callable[[Any], Awaitable[int]]) -> int:
    from credit_engine.engine.runtime import Runtime

    async def main() -> int:
        rt = await Runtime.open(_connected(settings))
        try:
            return await action(rt)
        finally:
            await rt.close()

    return asyncio.run(main())


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.embedded import EmbeddedSetupError
    from credit_engine.engine.up import run_up

    try:
        return run_up(settings, args.host, args.port)
    except EmbeddedSetupError as error:  # this machine cannot run the embedded servers as asked: say what to change
        print(f"credit-engine up: {error}", file=sys.stderr)
        return EXIT_USAGE


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from credit_engine.webapp.app import create_app

    settings = _connected(settings)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through the engine's own handler and format (engine/logs.py)
        access_log=False,
    )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.worker.main import run_worker

    run_worker(_connected(settings))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.migrate import upgrade_to_head

    settings = _connected(settings)
    assert settings.database_url is not None
    upgrade_to_head(settings.database_url)
    print("migrated to head")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.progress import ProgressLine
    from credit_engine.engine.reconciler import check, repair

    async def action(rt: Any) -> int:
        orgs = args.org or None
        if args.repair:
            report = await repair(rt, orgs, ProgressLine("reconcile"))
            if report.credits_applied:
                print(f"applied {report.credits_applied} credits that were committed but not yet in redis")
            for org_id in report.repaired:
                print(f"repaired {org_id}")
            for org_id, why in report.failed.items():
                print(f"could not repair {org_id}: {why}")
            after = report.after
            print(f"after repair: {len(after.drifted)} drifted, {len(after.busy)} busy")
            return EXIT_OK if after.clean and not report.failed else EXIT_DRIFT
        result = await check(rt, orgs, ProgressLine("reconcile"))
        if args.json:
            print(
                json.dumps(
                    {
                        "orgs_checked": result.orgs_checked,
                        "drifted": [asdict(d) for d in result.drifted],
                        "busy": result.busy,
                        "seconds": round(result.seconds, 3),
                    }
                )
            )
        else:
            for drift in result.drifted:
                print(f"DRIFT {drift.org_id}")
                for problem in drift.problems:
                    print(f"  {problem}")
            for org_id in result.busy:
                print(f"BUSY  {org_id}: changed on every read, not verified")
            print(
                f"checked {result.orgs_checked} orgs in {result.seconds:.2f}s: "
                f"{len(result.drifted)} drifted, {len(result.busy)} busy"
            )
        return EXIT_OK if result.clean else EXIT_DRIFT

    return _with_runtime(settings, action)


def _settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from credit_engine.engine.errors import InvalidInput
    from credit_engine.engine.org_settings import OrgSettings

    values = {name: getattr(args, name) for name in OrgSettings.names() if getattr(args, name, None) is not None}
    for name in getattr(args, "unset", None) or ():  # back to the default
        if name in values:
            raise InvalidInput(name, "is both given and unset")
        values[name] = None
    return values


def cmd_orgs(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.balances import read_wallet
    from credit_engine.engine.errors import InvalidInput, OrgExists, OrgNotFound
    from credit_engine.engine.org_settings import OrgSettings
    from credit_engine.engine.orgs import create_org, get_org, update_org

    async def action(rt: Any) -> int:
        try:
            if args.orgs_command == "create":
                values = _settings_from_args(args)
                org = await create_org(rt, args.org_id, args.name or args.org_id, OrgSettings(**values))
            elif args.orgs_command == "update":
                changes = _settings_from_args(args)
                if args.name:
                    changes["name"] = args.name
                org = await update_org(rt, args.org_id, changes)
            else:
                org = await get_org(rt, args.org_id)
        except (InvalidInput, OrgExists, OrgNotFound) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        wallet = await read_wallet(rt, org.org_id)
        print(
            json.dumps(
                {
                    "org_id": org.org_id,
                    "name": org.name,
                    "settings": asdict(org.settings),
                    "wallet": asdict(wallet) if wallet else None,
                },
                indent=2,
            )
        )
        return EXIT_OK

    return _with_runtime(settings, action)


def cmd_topup(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.credits import credit
    from credit_engine.engine.errors import InvalidInput, OrgNotFound
    from credit_engine.engine.results import Outcome

    async def action(rt: Any) -> int:
        key = args.idempotency_key or f"cli-{secrets.token_hex(8)}"
        try:
            result = await credit(rt, args.org_id, key, args.amount_pence)
        except (InvalidInput, OrgNotFound) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        if result.outcome == Outcome.idempotency_conflict:
            print(f"error: idempotency key {key!r} was used for {result.amount_pence} pence", file=sys.stderr)
            return EXIT_USAGE
        money = result.money
        print(
            json.dumps(
                {
                    "outcome": result.outcome.name,
                    "transaction_id": result.entry_id,
                    "idempotency_key": key,
                    "applied_in_redis": result.applied,
                    "balance_pence": money.balance_pence if money else None,
                    "available_pence": money.available_pence if money else None,
                },
                indent=2,
            )
        )
        return EXIT_OK

    return _with_runtime(settings, action)


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import locust  # noqa: F401
    except ImportError:
        print('locust is not installed: pip install ".[load]"', file=sys.stderr)
        return EXIT_USAGE
    from credit_engine.loadtest.runner import main as loadtest_main

    return loadtest_main(args.loadtest_args)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.loadtest.bench import main as bench_main

    return bench_main(args.bench_args)


def _add_org_settings(parser: argparse.ArgumentParser, creating: bool) -> None:
    """One flag per org setting, as engine/org_setting_table.py declares it."""
    for setting in table.SETTINGS:
        kind = int if setting.kind == "integer" else str
        required = creating and setting.required
        parser.add_argument(setting.flag, dest=setting.name, type=kind, required=required, help=setting.help)


DATA_DIR_HELP = "where `up` keeps its data, and where the other commands find its servers (default .credit-engine)"


def _accept_data_dir_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--data-dir` is a global option that may also follow any command (`credit-engine up --data-dir
    D`, as the README writes it). A command's copy has no default, so it never overwrites one given
    before the command; the commands that parse their own options (loadtest, bench) are left alone."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if command.add_help:
                    command.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=DATA_DIR_HELP)
                    _accept_data_dir_everywhere(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credit-engine", description="Prepaid credit engine for Vapi calls.")
    parser.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run everything on this machine")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080)
    up.set_defaults(handler=cmd_up)

    serve = commands.add_parser("serve", help="run the web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(handler=cmd_serve)

    commands.add_parser("worker", help="run the arq worker").set_defaults(handler=cmd_worker)
    commands.add_parser("migrate", help="migrate Postgres to the latest schema").set_defaults(handler=cmd_migrate)

    reconcile = commands.add_parser("reconcile", help="compare Redis with Postgres (exit 1 on drift)")
    mode = reconcile.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report drift (the default)")
    mode.add_argument("--repair", action="store_true", help="rewrite drifted orgs in Redis from Postgres")
    reconcile.add_argument("--org", action="append", help="only this org (repeatable)")
    reconcile.add_argument("--json", action="store_true", help="machine-readable report (with --check)")
    reconcile.set_defaults(handler=cmd_reconcile)

    orgs = commands.add_parser("orgs", help="create, show or update an org")
    org_commands = orgs.add_subparsers(dest="orgs_command", required=True)
    create = org_commands.add_parser("create")
    create.add_argument("org_id")
    create.add_argument("--name")
    _add_org_settings(create, creating=True)
    show = org_commands.add_parser("show")
    show.add_argument("org_id")
    update = org_commands.add_parser("update")
    update.add_argument("org_id")
    update.add_argument("--name")
    _add_org_settings(update, creating=False)
    update.add_argument(
        "--unset",
        action="append",
        choices=table.UNSETTABLE,
        metavar="SETTING",
        help=f"back to its default (repeatable): {', '.join(table.UNSETTABLE)}",
    )
    orgs.set_defaults(handler=cmd_orgs)

    loadtest = commands.add_parser(
        "loadtest", help="the seed's load scenarios with locust (see --help)", add_help=False
    )
    loadtest.add_argument("loadtest_args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(handler=cmd_loadtest)
    bench = commands.add_parser("bench", help="benchmarks, side by side, in one run (see --help)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)

    topup = commands.add_parser("topup", help="credit an org (Postgres-first)")
    topup.add_argument("org_id")
    topup.add_argument("amount_pence", type=int)
    topup.add_argument("--idempotency-key", help="repeat a top-up safely (default: a new random key)")
    topup.set_defaults(handler=cmd_topup)

    verify = commands.add_parser("verify", help="check a deployment (exit 1 on any failed check)")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.add_argument(
        "--sample", type=int, default=50, help="orgs to compare between Redis and Postgres (default 50)"
    )
    verify.set_defaults(handler=cmd_verify)

    status = commands.add_parser("status", help="balances, live calls, ledger lag and worker health")
    status.add_argument("--org", help="one org's balance and live calls")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C, like top")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    status.add_argument("--json", action="store_true", help="one JSON object per refresh")
    status.set_defaults(handler=cmd_status)

    vapi = commands.add_parser("vapi", help="connect a Vapi account (VAPI_API_KEY): import, connect, check its numbers")
    vapi_commands = vapi.add_subparsers(dest="vapi_command", required=True)
    vapi_import = vapi_commands.add_parser("import", help="list the account's numbers; with --org, register them")
    vapi_import.add_argument("--org", help="register every unregistered number to this org (without: change nothing)")
    vapi_import.add_argument("--json", action="store_true", help="machine-readable report")
    vapi_connect = vapi_commands.add_parser("connect", help="make registered numbers bare, with the engine as server")
    vapi_connect.add_argument("--org", help="only this org's numbers")
    vapi_connect.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    vapi_connect.add_argument("--json", action="store_true", help="machine-readable report")
    vapi_check = vapi_commands.add_parser("check", help="a tick or a cross per number and setting (exit 1 on a cross)")
    vapi_check.add_argument("--json", action="store_true", help="machine-readable report")
    vapi.set_defaults(handler=cmd_vapi)

    audit = commands.add_parser(
        "audit", help="compare the ledger with Vapi's own records of calls (exit 1 on a mismatch)"
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_vapi = audit_commands.add_parser(
        "vapi",
        help="Vapi's calls in a window against the ledger: unbilled, other seconds, unknown to Vapi",
        description="List Vapi's calls created in [--since, --until) (VAPI_API_KEY; GET /call, paced by "
        "CREDIT_ENGINE_VAPI_API_RPS) for the numbers registered here, and compare each with how the engine "
        "billed it. Exit 0: nothing left to fix; 1: a mismatch remains; 2: bad input or a missing setting.",
    )
    audit_vapi.add_argument("--since", required=True, help="start of the window: YYYY-MM-DD (UTC) or an ISO date-time")
    audit_vapi.add_argument("--until", help="end of the window, excluded (default: now)")
    audit_vapi.add_argument(
        "--settle",
        action="store_true",
        help="bill what was never billed, at Vapi's seconds (once: a rerun bills nothing)",
    )
    audit_vapi.add_argument("--json", action="store_true", help="machine-readable report")
    audit.set_defaults(handler=cmd_audit)
    _accept_data_dir_everywhere(parser)
    return parser


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.verify import verify

    result = asyncio.run(verify(_connected(settings), sample_size=args.sample))
    print(json.dumps(result.as_json(), indent=2) if args.json else result.table())
    return EXIT_OK if result.ok else EXIT_DRIFT


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from credit_engine.engine.status import deployment_status, org_status

    async def action(rt: Any) -> int:
        stop = asyncio.Event()
        if args.watch:  # Ctrl-C ends the watch between two refreshes, or abandons the one under way
            _stop_on_first_ctrl_c(stop)
        while not stop.is_set():
            refresh = asyncio.ensure_future(org_status(rt, args.org) if args.org else deployment_status(rt))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({refresh, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not refresh.done():
                refresh.cancel()
                break
            status = refresh.result()
            if status is None:
                print(f"no org {args.org} in Redis", file=sys.stderr)
                return EXIT_USAGE
            _show_status(args, status)
            if not args.watch:
                return EXIT_OK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            if not stop.is_set() and not sys.stdout.isatty() and not args.json:
                print(f"--- {time.strftime('%H:%M:%S')}", flush=True)
        return EXIT_OK

    try:
        return _with_runtime(settings, action)
    except KeyboardInterrupt:
        return EXIT_OK


def _stop_on_first_ctrl_c(stop: asyncio.Event) -> None:
    """The first Ctrl-C sets `stop`; a second interrupts whatever still runs, as usual."""

    def first_ctrl_c() -> None:
        stop.set()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, first_ctrl_c)


def _show_status(args: argparse.Namespace, status: Any) -> None:
    """One status as a JSON line, or rendered (a watch on a terminal redraws the screen)."""
    from credit_engine.engine.status import as_json, render_deployment, render_org

    if args.json:
        print(json.dumps(as_json(status)), flush=True)
    else:
        text = render_org(status) if args.org else render_deployment(status)
        print(("\x1b[H\x1b[2J" if args.watch and sys.stdout.isatty() else "") + text, flush=True)


def _webhook_secret_of_up(settings: Settings) -> Settings:
    """The webhook secret a `credit-engine up` generated (<data-dir>/secrets.env), when the
    environment has none: the numbers must carry the secret the running engine checks."""
    from credit_engine.engine.services_file import read_secrets

    if settings.vapi_webhook_secret is not None:
        return settings
    generated = read_secrets(settings.data_dir).get("VAPI_WEBHOOK_SECRET")
    return replace(settings, vapi_webhook_secret=generated) if generated else settings


def cmd_vapi(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.call_server import engine_server
    from credit_engine.engine.errors import InvalidInput, OrgNotFound
    from credit_engine.engine.vapi_account import VapiAccount, VapiError

    if settings.vapi_api_key is None:
        print(
            "error: VAPI_API_KEY is not set: the Vapi account's private API key (Vapi dashboard, API Keys)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = _webhook_secret_of_up(settings)
    desired = engine_server(settings)
    unusable = _connect_settings_missing(args, desired)
    if unusable is not None:
        print(f"error: {unusable}", file=sys.stderr)
        return EXIT_USAGE

    async def action(rt: Any) -> int:
        async with VapiAccount(
            settings.vapi_api_key or "", settings.vapi_base_url, redacted=(settings.vapi_webhook_secret,)
        ) as account:
            try:
                report = await _vapi_report(args, settings, rt, account, desired)
            except OrgNotFound as error:
                print(f"error: {error} (create it with `credit-engine orgs create`)", file=sys.stderr)
                return EXIT_USAGE
            except InvalidInput as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_USAGE
            except VapiError as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_FAILED
        print(json.dumps(report.as_json(), indent=2) if args.json else report.table())
        return EXIT_OK if report.ok else EXIT_FAILED

    return _with_runtime(settings, action)


def _connect_settings_missing(args: argparse.Namespace, desired: dict[str, Any] | None) -> str | None:
    """What `vapi connect` lacks, if anything: the public URL the numbers' server will be, and a
    way to authenticate Vapi's messages to the engine. The other `vapi` commands need neither."""
    if args.vapi_command != "connect":
        return None
    if desired is None:
        return (
            "CREDIT_ENGINE_PUBLIC_URL is not set: it is where Vapi reaches this engine "
            "(https://credit.example.com), and the numbers' server is <it>/api/vapi/webhook"
        )
    if "credentialId" not in desired and "headers" not in desired:
        return (
            "neither CREDIT_ENGINE_VAPI_CREDENTIAL_ID nor VAPI_WEBHOOK_SECRET is set: nothing would "
            "authenticate Vapi's messages to the engine"
        )
    return None


async def _vapi_report(
    args: argparse.Namespace, settings: Settings, rt: Any, account: Any, desired: dict[str, Any] | None
) -> Any:
    """Run the `vapi` subcommand asked for; its report has .ok, .table() and .as_json()."""
    from credit_engine.engine.progress import ProgressLine
    from credit_engine.engine.vapi_check import check_account
    from credit_engine.engine.vapi_setup import connect_numbers, import_numbers

    if args.vapi_command == "import":
        return await import_numbers(rt, account, args.org, on_page=_on_listing_page)
    if args.vapi_command == "connect":
        assert desired is not None
        progress = ProgressLine("connect", sys.stderr, unit="numbers", flagged="failed")
        return await connect_numbers(
            rt, account, desired, org_id=args.org, dry_run=args.dry_run, progress=progress, on_page=_on_listing_page
        )
    return await check_account(rt, account, settings)


def _on_listing_page(pages: int, count: int) -> None:
    if pages > 1:  # a large account: say where the listing is
        print(f"listing the Vapi account's numbers: {count} after {pages} pages", file=sys.stderr, flush=True)


def _instant(text: str, option: str) -> Any:
    """A date (midnight UTC) or an ISO date-time with a zone (none: UTC); InvalidInput otherwise."""
    from datetime import UTC, datetime

    from credit_engine.engine.errors import InvalidInput

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(option, f"must be YYYY-MM-DD or an ISO 8601 date-time, got {text[:40]!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _audit_window(args: argparse.Namespace) -> tuple[Any, Any]:
    from datetime import UTC, datetime

    from credit_engine.engine.errors import InvalidInput

    since = _instant(args.since, "--since")
    until = _instant(args.until, "--until") if args.until else datetime.now(UTC)
    if since >= until:
        raise InvalidInput("--until", "the window is empty: --since must come before --until")
    return since, until


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from credit_engine.engine.errors import InvalidInput

    if settings.vapi_api_key is None:
        print("error: VAPI_API_KEY is not set: the audit reads Vapi's own records of calls", file=sys.stderr)
        return EXIT_USAGE
    try:
        since, until = _audit_window(args)
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return _with_runtime(settings, lambda rt: _run_audit(args, rt, since, until))


async def _run_audit(args: argparse.Namespace, rt: Any, since: Any, until: Any) -> int:
    from credit_engine.engine.audit import audit_vapi
    from credit_engine.engine.progress import ProgressLine
    from credit_engine.engine.vapi_account import VapiAccount, VapiError
    from credit_engine.engine.vapi_calls import VapiPace

    settings = rt.settings
    pace = VapiPace(rt.redis, rt.keys, settings.vapi_api_rps)
    progress = ProgressLine("audit", sys.stderr, unit="calls", flagged="mismatched")
    async with VapiAccount(settings.vapi_api_key, settings.vapi_base_url, pace=pace.wait_turn) as account:
        try:
            report = await audit_vapi(
                rt, account, since, until, settle=args.settle, on_page=_on_calls_page, progress=progress
            )
        except VapiError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(report.as_json(), indent=2) if args.json else report.table())
    return EXIT_OK if report.ok else EXIT_FAILED


def _on_calls_page(pages: int, count: int) -> None:
    if pages > 1:  # a large window: say where the listing is
        print(f"listing Vapi's calls: {count} after {pages} pages", file=sys.stderr, flush=True)


PASSTHROUGH = {"bench": cmd_bench, "loadtest": cmd_loadtest}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        # These parse their own options (argparse's REMAINDER would not pass a leading --flag on).
        return PASSTHROUGH[argv[0]](argparse.Namespace(bench_args=argv[1:], loadtest_args=argv[1:]), Settings())
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.data_dir is not None:
        settings = replace(settings, data_dir=args.data_dir)
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.handler(args, settings))
    except ConfigError as error:  # a setting only this command needs (the worker's arq Redis)
        print(f"configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`credit-engine status --json | head -1`): stop quietly, as a shell
        # tool does, rather than with a traceback (and a second one when stdout is flushed at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
