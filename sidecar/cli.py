"""`qos-sidecar serve | validate | explain | refusals | top | usage | simulate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from sidecar.errors import PolicyError, SidecarError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qos-sidecar", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from sidecar.settings import add_arguments

    serve = commands.add_parser("serve", help="run the sidecar")
    add_arguments(serve)

    check = commands.add_parser("validate", help="check policy files; non-zero on any error")
    check.add_argument("paths", nargs="+", type=Path)

    _add_explain(commands)
    _add_refusals(commands)

    top = commands.add_parser("top", help="live view of tenants, classes and models")
    top.add_argument("--url", action="append", required=True, help="a sidecar's admin URL")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--policy", type=Path, action="append", default=[], help="for headroom")
    import sidecar.usage_report as usage_report

    usage = commands.add_parser(
        "usage", help="per-tenant usage and capacity review, from Prometheus"
    )
    usage_report.add_arguments(usage)
    from sidecar.simulate import command as simulate

    simulate.add_arguments(
        commands.add_parser("simulate", help="replay recorded traffic under two policies")
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "validate":
            return validate(args.paths)
        if args.command == "top":
            from sidecar.top import run as top_run

            return top_run(args.url, args.interval, once=args.once, policy_paths=args.policy)
        if args.command == "usage":
            return usage_report.run(args)
        if args.command == "simulate":
            return simulate.run(args, sys.stdout, sys.stderr)
        if args.command == "refusals":
            return _refusals(args.admin, args.tenant, args.limit)
        return _explain(args)
    except SidecarError as exc:
        print(f"qos-sidecar: {exc}", file=sys.stderr)
        return 2


def _add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain", help="show the decision a request would get, without taking quota"
    )
    explain.add_argument("path", help="request path, e.g. /v2/models/simgpu/infer")
    explain.add_argument("-H", "--header", action="append", default=[], help="NAME: VALUE")
    explain.add_argument("--method", default="POST")
    explain.add_argument("--principal")
    where = explain.add_mutually_exclusive_group()
    where.add_argument("--admin", help="ask a running sidecar, e.g. http://127.0.0.1:9090")
    where.add_argument(
        "--policy", type=Path, action="append", help="evaluate against policy files offline"
    )


def _add_refusals(commands: Any) -> None:
    refusals = commands.add_parser(
        "refusals", help="the last refusals of running sidecars, with each decision's steps"
    )
    refusals.add_argument("--admin", action="append", required=True, help="an admin URL")
    refusals.add_argument("--tenant", help="only this tenant's")
    refusals.add_argument("--limit", type=int, default=20, help="at most this many (newest)")


def validate(
    paths: Sequence[Path | str], *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`qos-sidecar validate PATH...`: check policy files without starting anything.

    Prints every problem as `file:line: message` (the form editors and CI logs link to) on
    `err` (stderr) and returns 1, or a one-line summary on `out` (stdout) and returns 0,
    with a `note:` line on `err` for each setting that is valid but changes nothing (a
    `lease_ms` that no request can use) and each class that none of a tenant's limits bound
    (`core.policy_notes`).
    """
    from sidecar.core.policy_notes import policy_notes
    from sidecar.core.shadow import compile_with_shadow
    from sidecar.policy.loader import load_policy

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        policy = load_policy(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return 1
    print(
        f"ok: {len(policy.classes)} classes, {len(policy.tenants)} tenants, "
        f"version {policy.version}",
        file=out,
    )
    for note in policy_notes(compile_with_shadow(policy).policy):  # as enforced
        print(f"note: {note}", file=err)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sidecar.app import run
    from sidecar.settings import load_settings

    settings = load_settings(args)
    if settings.workers > 1 and settings.worker_index < 0:
        from sidecar.workers import run_workers

        return run_workers(settings)
    run(settings)
    return 0


def _explain(args: argparse.Namespace) -> int:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"qos-sidecar: header {item!r}: expected NAME: VALUE", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    payload = {
        "path": args.path,
        "method": args.method,
        "headers": headers,
        "principal": args.principal,
    }
    if args.admin:
        request = urllib.request.Request(
            args.admin.rstrip("/") + "/v1/explain",
            data=json.dumps(payload).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                report = json.load(response)
        except (urllib.error.URLError, OSError) as exc:
            print(f"qos-sidecar: cannot reach {args.admin}: {exc}", file=sys.stderr)
            return 2
    else:
        report = asyncio.run(_explain_offline(args.policy or [Path("policies")], payload))
    _print_explanation(report)
    return 0


def _refusals(admins: list[str], tenant: str | None, limit: int) -> int:
    """Every replica's `/v1/refusals`, merged newest first: replicas keep their own. One that
    cannot be read is named on stderr and the exit status is 2, after what the others had."""
    query = urllib.parse.urlencode(
        {"limit": max(0, limit), **({"tenant": tenant} if tenant else {})}
    )
    found: list[tuple[float, str, dict[str, Any]]] = []
    unread = 0
    for admin in admins:
        try:
            with urllib.request.urlopen(f"{admin.rstrip('/')}/v1/refusals?{query}", timeout=5) as r:
                found += [(e["at"], admin, e) for e in json.load(r)["refusals"]]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            print(f"qos-sidecar: cannot read {admin}: {exc}", file=sys.stderr)
            unread += 1
    for at, admin, entry in sorted(found, key=lambda f: f[0], reverse=True)[: max(0, limit)]:
        when = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"
        print(
            f"{when} {entry['status']} {entry['reason']} tenant={entry['tenant']} "
            f"class={entry['class']} id={entry['request_id']} ({admin})"
        )
        for step in entry["trace"]:
            print(f"  - {step}")
    return 2 if unread else 0


async def _explain_offline(paths: list[Path], payload: dict[str, object]) -> dict[str, object]:
    """Against policy files and an empty in-memory store: what a fresh tenant would get."""
    from prometheus_client import CollectorRegistry

    from sidecar.admin.http import explain_request_from_json, explanation_json
    from sidecar.metrics import Metrics
    from sidecar.policy.loader import load_policy
    from sidecar.service import AdmissionService
    from sidecar.state.memory import MemoryQuotaStore

    try:
        policy = load_policy(paths)
    except PolicyError:
        raise
    service = AdmissionService(policy, MemoryQuotaStore(), Metrics(CollectorRegistry()))
    return explanation_json(await service.explain(explain_request_from_json(payload)))


def _print_explanation(report: dict[str, object]) -> None:
    print(f"{report['outcome']} {report['status']} ({report['reason']})")
    print(f"  tenant: {report['tenant']}  class: {report['class']}")
    for step in report.get("trace") or []:  # type: ignore[attr-defined]
        print(f"  - {step}")
    headers = report.get("headers") or {}
    for name, value in headers.items():  # type: ignore[attr-defined]
        print(f"  {name}: {value}")


if __name__ == "__main__":
    sys.exit(main())
