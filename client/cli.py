"""quotactl: the operator's command line, a thin layer on QuotaClient.

Human-readable output by default, `--json` for scripts (the RPC's response message in
the proto3 JSON mapping, quota_sidecar.api.json_mapping; errors as one JSON object on
stderr). Exit status: 0 done, 1 the sidecar answered with an error, 2 bad usage, 3 the
sidecar could not be reached; with `--exit-status`, `check`, `add` and `enroll` also exit
4 on DENY and 5 on DEFER or EXPIRED.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

from google.protobuf.message import Message

from quota_sidecar.api.credentials import TLS_FLAGS, one_secret, tls_credentials
from quota_sidecar.api.json_mapping import message_json
from quota_sidecar.api.v1 import quota_pb2

from ._errors import QuotaError, Unavailable
from ._results import (
    ActiveContact,
    ActivityRecord,
    ContactAddDecision,
    ContactState,
    EnrollDecision,
    Invoice,
    Plan,
    SendDecision,
    Usage,
    UsageEvent,
    rule_pairs,
)
from ._sync import QuotaClient
from ._wire import ProtoEnum, short_names

COMMANDS: tuple[str, ...] = (
    "usage",
    "plan set",
    "plan get",
    "check",
    "add",
    "activity",
    "enroll",
    "contact",
    "active-contacts",
    "invoice",
    "events",
)
"""Every quotactl command, as typed after `quotactl`."""

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0
ADDRESS_ENV = "QUOTA_ADDRESS"
ADMIN_TOKEN_ENV = "QUOTA_ADMIN_TOKEN"
ADMIN_TOKEN_FILE_ENV = "QUOTA_ADMIN_TOKEN_FILE"

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# Opt-in (`--exit-status`) codes for an answer that is not ALLOW. They follow the codes
# above rather than reuse 3, so a script never takes an unreachable sidecar for a denial.
EXIT_DENY = 4
EXIT_NOT_NOW = 5
DECISION_EXITS = {"DENY": EXIT_DENY, "DEFER": EXIT_NOT_NOW, "EXPIRED": EXIT_NOT_NOW}
EXIT_BROKEN_PIPE = 141

PROG = "quotactl"
PRESETS = ("contact-limit", "active-cycle-hard", "active-cycle-overage", "marketing-contacts")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one quotactl command; returns the exit status."""
    parser = build_parser(os.environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        token = one_secret("--admin-token", ADMIN_TOKEN_ENV, args.admin_token or None, args.admin_token_file or None)
        client = QuotaClient(
            args.address,
            admin_token=token,
            timeout=args.timeout,
            admin_timeout=args.timeout,
            credentials=tls_credentials(args.tls_ca, args.tls_cert, args.tls_key),
        )
    except (ValueError, OSError) as error:
        _report(args.json, "USAGE", str(error))
        return EXIT_USAGE
    try:
        with client:
            run: Callable[[QuotaClient, argparse.Namespace], int] = args.run
            return run(client, args)
    except BrokenPipeError:
        # the reader went away (`quotactl … | head`): stop quietly, as a shell tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Unavailable as error:
        _report(args.json, error.code_name, error.message)
        return EXIT_UNREACHABLE
    except QuotaError as error:
        _report(args.json, error.code_name, error.message)
        return EXIT_SERVER_ERROR


def _report(as_json: bool, code: str, message: str) -> None:
    """One line on stderr: `quotactl: CODE: message`, or under --json `{"error": {"code", "message"}}`."""
    text = " ".join(message.split())
    if as_json:
        print(json.dumps({"error": {"code": code, "message": text}}), file=sys.stderr)
    else:
        print(f"{PROG}: {code}: {text}" if code != "USAGE" else f"{PROG}: {text}", file=sys.stderr)


def _version() -> str:
    try:
        return importlib.metadata.version("quota-sidecar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser; `environ` supplies QUOTA_ADDRESS, QUOTA_ADMIN_TOKEN(_FILE) and the TLS files."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read and manage the quota sidecar's tenants, plans and figures.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    _global_options(parser, environ, suppress=False)
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        summary: str,
        run: Callable[[QuotaClient, argparse.Namespace], int],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=summary, description=description or summary)
        _global_options(sub, environ, suppress=True)
        sub.set_defaults(run=run)
        return sub

    usage = command(
        commands,
        "usage",
        "show a tenant's figures for the current or a past cycle",
        _usage,
        "show a tenant's figures for the current or a past cycle: the metered count against the limit, its"
        " peak in the cycle, sends, state and overage",
    )
    usage.add_argument("tenant")
    usage.add_argument("--cycle", type=_instant, help="any instant of a past cycle (ISO 8601)")

    plan = commands.add_parser("plan", help="set or show a tenant's plan", description="set or show a tenant's plan")
    _global_options(plan, environ, suppress=True)
    plan_commands = plan.add_subparsers(title="commands", dest="plan_command", required=True, metavar="COMMAND")
    plan_set = command(
        plan_commands,
        "set",
        "create or replace a tenant's plan",
        _plan_set,
        "create or replace a tenant's plan, from a preset (one of the four billing models) or field by field;"
        " with --preset, the options given beside it override the preset's values, 0 or empty included"
        ' (--grace-percent 0, --notify "")',
    )
    plan_set.add_argument("tenant")
    plan_set.add_argument(
        "--preset",
        metavar="NAME",
        help=f"one of {', '.join(PRESETS)} (the four billing models); options given beside it override its values",
    )
    plan_set.add_argument(
        "--name",
        dest="plan_name",
        help="the plan's name, e.g. GROW (with --preset active-cycle-overage and no --limit, START, GROW, EXPAND"
        " or SCALE give 50, 250, 500 or 2000 contacts)",
    )
    plan_set.add_argument("--metering", type=_choice(quota_pb2.Metering), metavar=_names(quota_pb2.Metering))
    plan_set.add_argument("--enforcement", type=_choice(quota_pb2.Enforcement), metavar=_names(quota_pb2.Enforcement))
    plan_set.add_argument("--limit", dest="contact_limit", type=_count, metavar="N", help="plan contacts")
    plan_set.add_argument("--addons", dest="addon_contacts", type=_count, metavar="N", help="add-on contacts")
    plan_set.add_argument("--grace-percent", type=_count, metavar="N")
    plan_set.add_argument("--sends-limit", type=_count, metavar="N", help="0 means unlimited")
    plan_set.add_argument("--sends-per-contact", type=_count, metavar="N")
    plan_set.add_argument("--overage-unit-price", type=_decimal, metavar="D", help="e.g. 0.25")
    plan_set.add_argument("--currency", metavar="C", help="e.g. EUR")
    plan_set.add_argument("--anchor", dest="cycle_anchor", type=_instant, metavar="ISO", help="subscription start")
    plan_set.add_argument(
        "--interval",
        dest="billing_interval",
        type=_choice(quota_pb2.BillingInterval),
        metavar=_names(quota_pb2.BillingInterval),
    )
    plan_set.add_argument(
        "--counted-kinds",
        type=_choices(quota_pb2.MessageKind),
        metavar="KIND,...",
        help=f"which sends make a contact active: {_names(quota_pb2.MessageKind)}",
    )
    plan_set.add_argument(
        "--counted-activities",
        type=_choices(quota_pb2.ActivityKind),
        metavar="ACTIVITY,...",
        help=f"which recorded activities make a contact active (CR-1): {_names(quota_pb2.ActivityKind)}",
    )
    plan_set.add_argument(
        "--source-rule",
        dest="source_rules",
        type=_source_rule,
        action="append",
        metavar="SOURCE=POLICY",
        help=f"e.g. IMPORT=REFUSE_IF_EXCEEDS; repeat for each source. Policies: {_names(quota_pb2.SourcePolicy)}",
    )
    plan_set.add_argument("--max-queue", type=_duration, metavar="DURATION", help="e.g. 24h (AC-9)")
    plan_set.add_argument("--renotify-interval", type=_duration, metavar="DURATION", help="e.g. 15d (AC-1)")
    plan_set.add_argument("--notify", dest="notify_thresholds", type=_ratios, metavar="R,...", help="e.g. 0.8,1.0")
    plan_set.add_argument(
        "--marketing-contacts-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="HELD_CONTACTS counts marketing contacts only (model 4, MK-1)",
    )
    plan_get = command(plan_commands, "get", "show a tenant's plan", _plan_get)
    plan_get.add_argument("tenant")

    check = command(commands, "check", "decide one send to one contact (counts it unless --dry-run)", _check)
    check.add_argument("tenant")
    check.add_argument("contact")
    check.add_argument(
        "--kind", type=_choice(quota_pb2.MessageKind), default="CAMPAIGN", metavar=_names(quota_pb2.MessageKind)
    )
    check.add_argument("--channel", type=_choice(quota_pb2.Channel), default="EMAIL", metavar=_names(quota_pb2.Channel))
    check.add_argument("--dry-run", action="store_true", help="decide and report, count nothing")
    check.add_argument("--queued-since", type=_instant, metavar="ISO", help="when the automation e-mail was queued")
    _exit_status_option(check)

    add = command(
        commands,
        "add",
        "add contacts through a source, if the plan allows (AC-2..AC-5)",
        _add,
        "ask whether contacts may be added through a source and, when allowed, add them (AC-2..AC-5); an"
        " IMPORT is all or nothing (AC-4); --dry-run decides and adds nothing",
    )
    _contacts_by(add, "--source", quota_pb2.ContactSource)
    add.add_argument(
        "--marketing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the marketing status new contacts get (model 4; default: the sidecar's, marketing)",
    )
    add.add_argument("--dry-run", action="store_true", help="decide and report, add nothing")
    _exit_status_option(add)

    activity = command(
        commands,
        "activity",
        "record activity that already happened (CR-1); never refused for quota",
        _activity,
        "record activity that already happened to contacts (CR-1: it may make them active this cycle);"
        " never refused for quota reasons",
    )
    _contacts_by(activity, "--kind", quota_pb2.ActivityKind)
    activity.add_argument("--at", dest="occurred_at", type=_instant, metavar="ISO", help="when (default: now)")
    activity.add_argument("--marketing", action="store_true", help="with MARKETING_STATUS_SET: set marketing")
    activity.add_argument("--source-type", default="", help="where the status came from (MK-5)")
    activity.add_argument("--source-id", default="", help="which form, import or list (MK-5)")

    enroll = command(
        commands,
        "enroll",
        "decide whether a contact may enter an automation (AC-7, AC-8)",
        _enroll,
        "decide whether a contact may enter an automation (AC-8, with the AC-7 grace); counts nothing",
    )
    enroll.add_argument("tenant")
    enroll.add_argument("contact")
    enroll.add_argument("automation")
    _exit_status_option(enroll)

    contact = command(
        commands,
        "contact",
        "show one contact as the ledger knows it (MK-5)",
        _contact,
        "show one contact as the ledger knows it: held, active this cycle, and its marketing status,"
        " until-next-update flag, source type and source id (MK-5)",
    )
    contact.add_argument("tenant")
    contact.add_argument("contact")

    active = command(
        commands,
        "active-contacts",
        "list the contacts behind an invoice's metered line",
        _active_contacts,
        "list the contacts behind an invoice's metered line: those active in the cycle, or under"
        " HELD_CONTACTS every contact held (model 4: as a marketing contact) at some time in the cycle,"
        " from when until when",
    )
    active.add_argument("tenant")
    active.add_argument("--cycle", type=_instant, help="any instant of the cycle (ISO 8601); default: the current one")
    active.add_argument(
        "--csv", action="store_true", help="print CSV: contact_id, activated_at, activity, counted_until"
    )

    invoice = command(
        commands,
        "invoice",
        "show a cycle's invoice lines and total (CR-6, CR-7)",
        _invoice,
        "show a cycle's billable figures: the invoice lines (description, quantity, unit price, amount,"
        " currency) and their total (CR-6, CR-7); --json prints the GetInvoice answer",
    )
    invoice.add_argument("tenant")
    invoice.add_argument("--cycle", type=_instant, help="any instant of the cycle (ISO 8601)")

    events = command(
        commands,
        "events",
        "list usage events: thresholds crossed and reminders (AC-1, CR-8, MK-2)",
        _events,
        "list usage events from the sidecar's outbox: notify thresholds crossed and reminders (AC-1, CR-8,"
        " MK-2, SG-4), one tenant's or every tenant's; --follow keeps printing new ones as they happen;"
        " --json prints one JSON document per line",
    )
    events.add_argument("tenant", nargs="?", default="", help="one tenant (default: every tenant)")
    events.add_argument("--after", type=_count, default=0, metavar="SEQ", help="only events after this sequence")
    events.add_argument("--follow", action="store_true", help="keep printing new events until interrupted")
    return parser


def _contacts_by(parser: argparse.ArgumentParser, flag: str, enum: ProtoEnum) -> None:
    """TENANT CONTACT… and the required enum option saying how (a source, an activity kind)."""
    parser.add_argument("tenant")
    parser.add_argument("contacts", nargs="+", metavar="CONTACT")
    parser.add_argument(flag, type=_choice(enum), required=True, metavar=_names(enum))


def _exit_status_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-status",
        action="store_true",
        help=f"exit {EXIT_DENY} on DENY and {EXIT_NOT_NOW} on DEFER or EXPIRED (default: 0 for every answer)",
    )


def _decided(args: argparse.Namespace, decision: str) -> int:
    return DECISION_EXITS.get(decision, EXIT_OK) if args.exit_status else EXIT_OK


def _global_options(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, suppress: bool) -> None:
    # Repeated on every subcommand so they may also follow it; there they default to
    # SUPPRESS, so that leaving them out does not overwrite what came before.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS),
        help=f"the sidecar, host:port or unix:///path (env {ADDRESS_ENV}, default {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--admin-token",
        default=default(environ.get(ADMIN_TOKEN_ENV)),
        help=f"the admin credential (env {ADMIN_TOKEN_ENV}); other users can read a command's arguments,"
        " so prefer the variable or --admin-token-file",
    )
    group.add_argument(
        "--admin-token-file",
        default=default(environ.get(ADMIN_TOKEN_FILE_ENV)),
        metavar="PATH",
        help=f"a file holding the admin credential (env {ADMIN_TOKEN_FILE_ENV})",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"the deadline of each call (default {DEFAULT_TIMEOUT:g})",
    )
    for flag, env, what in TLS_FLAGS:
        group.add_argument(flag, default=default(environ.get(env)), metavar="PEM", help=f"{what} (env {env})")
    group.add_argument("--json", action="store_true", default=default(False), help="print JSON")


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"not a price: {text!r}")
    return value


def _ratios(text: str) -> list[float]:
    try:
        return [float(part) for part in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta:
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit.lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration like 90s, 30m, 24h or 15d: {text!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return timedelta(seconds=seconds)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _names(enum: ProtoEnum) -> str:
    return "|".join(short_names(enum))


def _choice(enum: ProtoEnum) -> Callable[[str], str]:
    names = short_names(enum)

    def parse(text: str) -> str:
        name = text.strip().upper().replace("-", "_")
        if name not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return name

    parse.__name__ = enum.DESCRIPTOR.name
    return parse


def _choices(enum: ProtoEnum) -> Callable[[str], list[str]]:
    one = _choice(enum)

    def parse(text: str) -> list[str]:
        return [one(part) for part in _split(text)]

    parse.__name__ = enum.DESCRIPTOR.name
    return parse


def _source_rule(text: str) -> tuple[str, str]:
    source, sep, policy = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected SOURCE=POLICY, e.g. IMPORT=REFUSE_IF_EXCEEDS: {text!r}")
    return _choice(quota_pb2.ContactSource)(source), _choice(quota_pb2.SourcePolicy)(policy)


def _usage(client: QuotaClient, args: argparse.Namespace) -> int:
    usage = client.get_usage(args.tenant, cycle_start=args.cycle)
    if args.json:
        _print_json(quota_pb2.GetUsageResponse(usage=usage.raw))
    else:
        _print_fields(_usage_fields(usage))
    return EXIT_OK


_PLAN_OPTIONS = (
    "preset",
    "plan_name",
    "metering",
    "enforcement",
    "contact_limit",
    "addon_contacts",
    "grace_percent",
    "sends_limit",
    "sends_per_contact",
    "overage_unit_price",
    "currency",
    "cycle_anchor",
    "billing_interval",
    "counted_kinds",
    "counted_activities",
    "source_rules",
    "max_queue",
    "renotify_interval",
    "notify_thresholds",
    "marketing_contacts_only",
)


def _plan_set(client: QuotaClient, args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in _PLAN_OPTIONS if getattr(args, name) is not None}
    change = client.put_plan(args.tenant, Plan(**given))
    if args.json:
        _print_json(change.raw)
    else:
        _print_fields(_plan_fields(args.tenant, change.plan))
        if change.usage is not None:
            print()
            _print_fields(_usage_fields(change.usage))
    return EXIT_OK


def _plan_get(client: QuotaClient, args: argparse.Namespace) -> int:
    plan = client.get_plan(args.tenant)
    if args.json:
        _print_json(quota_pb2.GetPlanResponse(plan=plan.raw))
    else:
        _print_fields(_plan_fields(args.tenant, plan))
    return EXIT_OK


def _check(client: QuotaClient, args: argparse.Namespace) -> int:
    decision = client.check_send(
        args.tenant,
        args.contact,
        args.kind,
        channel=args.channel,
        dry_run=args.dry_run,
        queued_since=args.queued_since,
    )
    if decision.fallback and decision.error is not None:
        raise decision.error
    if args.json and decision.raw is not None:
        _print_json(decision.raw)
    else:
        _print_fields(_decision_fields(decision))
    return _decided(args, decision.decision)


def _add(client: QuotaClient, args: argparse.Namespace) -> int:
    decision: ContactAddDecision = client.check_contact_add(
        args.tenant, args.contacts, args.source, marketing=args.marketing, dry_run=args.dry_run
    )
    if decision.fallback and decision.error is not None:
        raise decision.error
    fields = [("decision", decision.decision), ("reason", decision.reason), ("added", str(decision.added))]
    _print_answer(args, decision.raw, fields, decision.usage)
    return _decided(args, decision.decision)


def _activity(client: QuotaClient, args: argparse.Namespace) -> int:
    record: ActivityRecord = client.record_activity(
        args.tenant,
        args.contacts,
        args.kind,
        occurred_at=args.occurred_at,
        marketing=args.marketing,
        source_type=args.source_type,
        source_id=args.source_id,
    )
    fields = [("recorded", str(record.recorded)), ("newly active", str(record.newly_active))]
    _print_answer(args, record.raw, fields, record.usage)
    return EXIT_OK


def _enroll(client: QuotaClient, args: argparse.Namespace) -> int:
    decision: EnrollDecision = client.check_enroll(args.tenant, args.contact, args.automation)
    if decision.fallback and decision.error is not None:
        raise decision.error
    _print_answer(args, decision.raw, [("decision", decision.decision), ("reason", decision.reason)], decision.usage)
    return _decided(args, decision.decision)


def _print_answer(
    args: argparse.Namespace, raw: Message | None, fields: list[tuple[str, str]], usage: Usage | None
) -> None:
    """The response message under --json; else `fields`, then the tenant's figures when the answer has them."""
    if args.json and raw is not None:
        _print_json(raw)
    else:
        _print_fields(fields + (_usage_fields(usage) if usage is not None else []))


def _contact(client: QuotaClient, args: argparse.Namespace) -> int:
    contact = client.get_contact(args.tenant, args.contact)
    if args.json:
        _print_json(quota_pb2.GetContactResponse(contact=contact.raw))
    else:
        _print_fields(_contact_fields(contact))
    return EXIT_OK


def _active_contacts(client: QuotaClient, args: argparse.Namespace) -> int:
    contacts = list(client.iter_active_contacts(args.tenant, cycle_start=args.cycle))
    if args.json:
        _print_json(quota_pb2.ListActiveContactsResponse(contacts=[contact.raw for contact in contacts]))
    elif args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["contact_id", "activated_at", "activity", "counted_until"])
        writer.writerows(
            [contact.contact_id, _when(contact.activated_at), contact.activity, _csv_when(contact.counted_until)]
            for contact in contacts
        )
    else:
        _print_table(["CONTACT", "ACTIVATED AT", "ACTIVITY", "COUNTED UNTIL"], _active_rows(contacts))
        print(f"{len(contacts)} {_counted_noun(contacts)}{'' if len(contacts) == 1 else 's'}")
    return EXIT_OK


# What ListActiveContacts lists under HELD_CONTACTS, by the activity it reports.
_HELD_NOUNS = {"HELD_CONTACT": "held contact", "MARKETING_CONTACT": "marketing contact"}


def _counted_noun(contacts: Sequence[ActiveContact]) -> str:
    nouns = {_HELD_NOUNS.get(contact.activity, "active contact") for contact in contacts}
    return nouns.pop() if len(nouns) == 1 else "active contact"


def _invoice(client: QuotaClient, args: argparse.Namespace) -> int:
    invoice = client.get_invoice(args.tenant, cycle_start=args.cycle)
    if args.json:
        _print_json(invoice.raw)
    else:
        _print_invoice(invoice)
    return EXIT_OK


def _events(client: QuotaClient, args: argparse.Namespace) -> int:
    header = ["SEQ", "OCCURRED AT", "TENANT", "TYPE", "FIGURE", "THRESHOLD", "COUNT", "LIMIT", "STATE"]
    stream = client.watch_usage_events(args.tenant, after_sequence=args.after, follow=args.follow)
    if args.json:
        for event in stream:
            print(message_json(event.raw), flush=True)
        return EXIT_OK
    if not args.follow:
        _print_table(header, [_event_row(event) for event in stream], right=(0, 5, 6, 7))
        return EXIT_OK
    print("\t".join(header), flush=True)
    try:
        for event in stream:
            print("\t".join(_event_row(event)), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _event_row(event: UsageEvent) -> list[str]:
    count, limit = (
        (event.usage.active_contacts, event.usage.contact_limit)
        if event.figure == "CONTACTS"
        else (event.usage.sends, event.usage.sends_limit)
    )
    return [
        str(event.sequence),
        _when(event.occurred_at),
        event.tenant_id,
        event.type,
        event.figure,
        f"{event.threshold:g}",
        str(count),
        str(limit),
        event.usage.state,
    ]


def _print_json(message: Message) -> None:
    print(message_json(message, indent=2))


def _print_fields(fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in fields) + 3
    for key, value in fields:
        print(f"{key:<{width}}{value}".rstrip())


def _print_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> None:
    """Columns padded to their widest cell; the columns numbered in `right` (figures) aligned right."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = (
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=False))
        )
        print("  ".join(cells).rstrip())


def _csv_when(value: datetime | None) -> str:
    return "" if value is None else _when(value)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _yes(value: bool | None) -> str:
    if value is None:
        return "-"
    return "yes" if value else "no"


def _span(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _money(amount: Decimal | None, currency: str | None) -> str:
    if amount is None:
        return "-"
    return f"{amount} {currency or ''}".strip()


def _cycle_fields(usage: Usage) -> list[tuple[str, str]]:
    """Whose figures, under which plan, for which cycle."""
    return [
        ("tenant", usage.tenant_id),
        ("plan", usage.plan_name or "-"),
        ("cycle", f"{_when(usage.cycle_start)} .. {_when(usage.cycle_end)}"),
    ]


def _usage_fields(usage: Usage) -> list[tuple[str, str]]:
    active = f"{usage.active_contacts} / {usage.contact_limit}"
    if usage.contact_limit:
        active += f" ({usage.usage_ratio:.0%})"
    sends = f"{usage.sends} / {usage.sends_limit}" if usage.sends_limit else f"{usage.sends} (unlimited)"
    overage = f"{usage.overage_contacts} contact{'' if usage.overage_contacts == 1 else 's'}"
    if usage.overage_amount is not None:
        overage += f", {_money(usage.overage_amount, usage.currency)}"
    return [
        *_cycle_fields(usage),
        ("active contacts", active),
        ("peak contacts", str(usage.peak_contacts)),
        ("sends", sends),
        ("state", usage.state),
        ("overage", overage),
    ]


def _decision_fields(decision: SendDecision) -> list[tuple[str, str]]:
    fields = [
        ("decision", decision.decision),
        ("reason", decision.reason),
        ("newly active", _yes(decision.newly_active)),
    ]
    if decision.retry_after is not None:
        fields.append(("retry after", _span(decision.retry_after)))
    if decision.usage is not None:
        fields.extend(_usage_fields(decision.usage))
    return fields


def _sends_limit(plan: Plan) -> str:
    if plan.sends_limit:
        return str(plan.sends_limit)
    if plan.sends_per_contact:
        limit = plan.sends_per_contact * (plan.contact_limit + plan.addon_contacts)
        return f"{limit} ({plan.sends_per_contact} per contact)"
    return "unlimited"


def _plan_fields(tenant_id: str, plan: Plan) -> list[tuple[str, str]]:
    rules = ", ".join(f"{source}={policy}" for source, policy in dict(rule_pairs(plan.source_rules)).items())
    return [
        ("tenant", tenant_id),
        ("plan", plan.plan_name or "-"),
        ("preset", plan.preset or "-"),
        ("metering", str(plan.metering)),
        ("marketing contacts only", _yes(plan.marketing_contacts_only)),
        ("enforcement", str(plan.enforcement)),
        ("contact limit", f"{plan.contact_limit} + {plan.addon_contacts} add-ons"),
        ("grace percent", str(plan.grace_percent)),
        ("sends limit", _sends_limit(plan)),
        ("sends per contact", str(plan.sends_per_contact or "-")),
        ("overage unit price", _money(_as_decimal(plan.overage_unit_price), plan.currency)),
        ("currency", plan.currency or "-"),
        ("cycle anchor", _when(plan.cycle_anchor if isinstance(plan.cycle_anchor, datetime) else None)),
        ("billing interval", str(plan.billing_interval)),
        ("counted kinds", ", ".join(map(str, plan.counted_kinds or ())) or "-"),
        ("counted activities", ", ".join(map(str, plan.counted_activities or ())) or "-"),
        ("source rules", rules or "-"),
        ("max queue", _span(plan.max_queue if isinstance(plan.max_queue, timedelta) else None)),
        ("notify at", ", ".join(str(ratio) for ratio in plan.notify_thresholds or ()) or "-"),
        ("renotify interval", _span(plan.renotify_interval if isinstance(plan.renotify_interval, timedelta) else None)),
    ]


def _as_decimal(value: Decimal | str | None) -> Decimal | None:
    return Decimal(value) if isinstance(value, str) else value


def _contact_fields(contact: ContactState) -> list[tuple[str, str]]:
    return [
        ("tenant", contact.tenant_id),
        ("contact", contact.contact_id),
        ("held", _yes(contact.held)),
        ("active this cycle", _yes(contact.active_this_cycle)),
        ("activated at", _when(contact.activated_at)),
        ("marketing", _yes(contact.marketing)),
        ("until next update", _yes(contact.marketing_until_next_update)),
        ("source type", contact.marketing_source_type or "-"),
        ("source id", contact.marketing_source_id or "-"),
    ]


def _active_rows(contacts: Iterable[ActiveContact]) -> list[list[str]]:
    return [
        [contact.contact_id, _when(contact.activated_at), contact.activity or "-", _when(contact.counted_until)]
        for contact in contacts
    ]


def _print_invoice(invoice: Invoice) -> None:
    if invoice.usage is not None:
        _print_fields(_cycle_fields(invoice.usage))
        print()
    rows = [
        [
            line.description,
            str(line.quantity),
            _amount(line.unit_price),
            _amount(line.amount),
            line.currency or "-",
        ]
        for line in invoice.lines
    ]
    _print_table(["DESCRIPTION", "QUANTITY", "UNIT PRICE", "AMOUNT", "CURRENCY"], rows, right=(1, 2, 3))
    print()
    _print_fields(_invoice_totals(invoice))


def _amount(value: Decimal | None) -> str:
    return "-" if value is None else str(value)


def _invoice_totals(invoice: Invoice) -> list[tuple[str, str]]:
    """The total of the lines' amounts per currency (a plan bills in one), exact decimals."""
    totals: dict[str, Decimal] = {}
    for line in invoice.lines:
        if line.amount is not None:
            totals[line.currency] = totals.get(line.currency, Decimal(0)) + line.amount
    if not totals:
        return [("total", "-")]
    return [("total", ", ".join(_money(amount, currency) for currency, amount in totals.items()))]


if __name__ == "__main__":
    sys.exit(main())
