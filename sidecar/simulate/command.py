"""`qos-sidecar simulate`: the subcommand's flags and its run (see docs/simulate.md).

Exit status: 0 when every `--fail-if` guard holds, 1 when one fails, 2 when the traffic, a
policy or a guard cannot be read (each problem printed as `file:line: message`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from sidecar.errors import PolicyError, SidecarError
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from sidecar.simulate.backend import ServerModel
from sidecar.simulate.replay import Arrival, replay
from sidecar.simulate.report import Guard, Row, compare, format_table, parse_guard, to_json
from sidecar.simulate.traffic import (
    Recording,
    TrafficError,
    parse_map,
    read_access_log,
    read_azure,
    read_records,
)

INPUTS = ("records", "access-log", "azure")
DEFAULT_RELEASE_GRACE_MS = 100  # the sidecar's own default (settings: release_grace_ms)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traffic", type=Path, help="the recording (see --input)")
    parser.add_argument("--current", type=Path, action="append", required=True, help="policy")
    parser.add_argument("--proposed", type=Path, action="append", required=True, help="policy")
    parser.add_argument(
        "--input",
        choices=INPUTS,
        help="records (benchmark records.csv[.gz]), access-log "
        "(Envoy JSON lines), azure (LLM trace); default from the file name",
    )
    parser.add_argument(
        "--model", help="model of every request (default: from the path; records and azure: llm)"
    )
    parser.add_argument("--system", default="passthrough", help="records: whose rows to replay")
    parser.add_argument("--run", help="records: which run (needed when there are several)")
    parser.add_argument("--measured", help="records: a system whose run to show beside")
    parser.add_argument("--map", help="azure: TENANT[/CLASS]=WEIGHT,... dealt to requests")
    parser.add_argument(
        "--drain-rate",
        type=float,
        help="completions/s of a model's server (default: measured in the recording)",
    )
    parser.add_argument(
        "--service-ms",
        type=float,
        help="a request's time alone on the server (default: measured in the recording)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="requests the server runs at once (default: drain rate x service time)",
    )
    parser.add_argument(
        "--as-written",
        action="store_true",
        help="apply shadow rules (enforce: false) too; default: as the sidecar enforces",
    )
    parser.add_argument(
        "--release-grace-ms",
        type=float,
        default=DEFAULT_RELEASE_GRACE_MS,
        help="wait for a release before a concurrency 429, as the sidecar's flag of that name",
    )
    parser.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="GUARD",
        help="exit 1 when this holds, e.g. 'shed_rate_increase_pts > 2'",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        guards = [parse_guard(text) for text in args.fail_if]
        policies = [_load(args.current, err), _load(args.proposed, err)]
        recording = _read(args)
        server = _server(args, recording)
        measured = _measured(args)
    except SidecarError as exc:
        if not isinstance(exc, PolicyError):  # its problems were printed one per line
            print(f"qos-sidecar simulate: {exc}", file=err)
        return 2
    arrivals = recording.arrivals
    grace_s = max(0.0, args.release_grace_ms / 1000)
    outcomes = [
        replay(arrivals, policy, server, grace_s, as_written=args.as_written) for policy in policies
    ]
    rows = compare(arrivals, outcomes[0], outcomes[1], measured)
    checked = [(guard, guard.violations(rows)) for guard in guards]
    about = {
        "requests": len(arrivals),
        "current": _about(policies[0]),
        "proposed": _about(policies[1]),
        "backend": {
            "drain_per_s": server.drain_per_s,
            "service_s": server.service_s,
            "slots": server.batch,
        },
    }
    if args.format == "json":
        print(to_json(rows, about, [_guard_json(g, v) for g, v in checked]), file=out)
    else:
        print(format_table(rows, _header(about)), file=out)
        for guard, found in checked:
            where = ", ".join(f"{r.tenant}/{r.klass} {v:+.2f}" for r, v in found)
            print(
                f"{'FAIL' if found else 'ok  '} {guard.text}{': ' + where if found else ''}",
                file=out,
            )
    return 1 if any(found for _, found in checked) else 0


def _load(paths: Sequence[Path], err: TextIO) -> Policy:
    try:
        return load_policy(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        raise


def _kind(args: argparse.Namespace) -> str:
    if args.input:
        return str(args.input)
    name = args.traffic.name
    if name.endswith((".csv.gz", "records.csv")):
        return "records"
    if name.endswith(".csv"):
        return "azure"
    return "access-log"


def _read(args: argparse.Namespace) -> Recording:
    kind = _kind(args)
    if kind == "records":
        return read_records(args.traffic, args.model or "llm", args.system, args.run)
    if kind == "azure":
        if not args.map:
            raise TrafficError(f"{args.traffic}:1: an Azure trace needs --map TENANT[/CLASS]=W,...")
        return read_azure(args.traffic, args.model or "llm", parse_map(args.map))
    return read_access_log(args.traffic, args.model)


def _measured(args: argparse.Namespace) -> list[tuple[Arrival, str]]:
    if not args.measured:
        return []
    if _kind(args) != "records":
        raise TrafficError("--measured: only benchmark records hold another system's run")
    seen = read_records(args.traffic, args.model or "llm", args.measured, args.run)
    return list(zip(seen.arrivals, seen.statuses, strict=True))


def _server(args: argparse.Namespace, recording: Recording) -> ServerModel:
    drain = args.drain_rate if args.drain_rate is not None else recording.drain_per_s()
    if drain is None or drain <= 0:
        raise TrafficError(
            f"{args.traffic}:1: the recording shows no request served: give --drain-rate"
        )
    service_s = args.service_ms / 1000 if args.service_ms is not None else recording.service_s()
    if service_s is None or service_s < 0:
        service_s = 1 / drain
    if args.slots < 0:
        raise TrafficError("--slots: must not be negative")
    return ServerModel(drain, service_s, args.slots)


def _about(policy: Policy) -> dict[str, object]:
    return {"version": policy.version, "sources": list(policy.sources)}


def _header(about: dict[str, object]) -> list[str]:
    backend = about["backend"]
    assert isinstance(backend, dict)
    current, proposed = about["current"], about["proposed"]
    assert isinstance(current, dict) and isinstance(proposed, dict)
    return [
        f"{about['requests']} requests; current policy {current['version']}, "
        f"proposed {proposed['version']}",
        f"backend per model: drains {backend['drain_per_s']:.2f}/s, "
        f"{1000 * backend['service_s']:.1f} ms alone, {backend['slots']} at once",
    ]


def _guard_json(guard: Guard, found: Sequence[tuple[Row, float]]) -> dict[str, object]:
    return {
        "guard": guard.text,
        "violated": bool(found),
        "where": [{"tenant": r.tenant, "class": r.klass, "value": v} for r, v in found],
    }
