"""`qos-sidecar simulate`: replay tables whose expected outcomes follow from the policy's
arithmetic (GCRA buckets, the load verdict, holds), the readers, the guards and the CLI."""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.errors import SidecarError
from sidecar.policy.loader import load_policy
from sidecar.simulate.backend import ModelServer, ServerModel
from sidecar.simulate.replay import Arrival, Outcome, replay
from sidecar.simulate.report import GuardError, compare, parse_guard
from sidecar.simulate.traffic import (
    TrafficError,
    deal,
    parse_map,
    read_access_log,
    read_azure,
    read_records,
)

BASE = """\
identity:
  sources: [{kind: api_key, header: x-api-key}]
unknown_tenants: {action: reject}
classes:
  interactive:
    rank: 1
    latency_objective_ms: 200
    max_wait_ms: MAX_WAIT
    triton_priority: 1
    on_state_error: open
    OVERLOAD
tenants:
  acme:
    match: {api_key_sha256: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]}
    allowed_classes: [interactive]
    default_class: interactive
    on_disallowed_class: reject
    buckets:
    - {name: requests, unit: requests, rate: RATE, per: second, burst: BURST}
"""


def write_policy(
    where: Path,
    *,
    rate: float = 10,
    burst: float = 5,
    max_wait_ms: int = 0,
    overload: str = "",
) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    text = BASE.replace("RATE", str(rate)).replace("BURST", str(burst))
    text = text.replace("MAX_WAIT", str(max_wait_ms)).replace("OVERLOAD", overload)
    (where / "policy.yaml").write_text(text)
    return where


def every(rate_per_s: float, seconds: float, tenant: str = "acme") -> list[Arrival]:
    count = round(rate_per_s * seconds)
    return [Arrival(i / rate_per_s, tenant, "interactive", "m") for i in range(count)]


IDLE_SERVER = ServerModel(drain_per_s=1000.0, service_s=0.001)


# -- Replay tables --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "offered_per_s"),
    [(10, 5, 20), (10, 5, 40), (4, 2, 20), (10, 20, 20)],
)
def test_a_bucket_admits_its_burst_and_its_rate_and_429s_the_rest(
    tmp_path: Path, rate: float, burst: float, offered_per_s: float
) -> None:
    policy = load_policy([write_policy(tmp_path, rate=rate, burst=burst)])
    arrivals = every(offered_per_s, 1.0)
    outcomes = replay(arrivals, policy, IDLE_SERVER)
    # GCRA: the k-th admit by time t needs k / rate - t <= burst / rate (backlogged from 0).
    last_s = arrivals[-1].at_s
    expected = min(len(arrivals), math.floor(burst + rate * last_s + 1e-9))
    assert outcomes.count(Outcome.ADMITTED) == expected
    assert outcomes.count(Outcome.OVER_QUOTA) == len(arrivals) - expected


def test_an_unknown_tenant_is_refused_by_the_policys_rule(tmp_path: Path) -> None:
    policy = load_policy([write_policy(tmp_path)])
    outcomes = replay([Arrival(0.0, "nobody", None, "m")], policy, IDLE_SERVER)
    assert outcomes == [Outcome.REFUSED]


OVERLOAD = "overload: {admit_below: 1, shed_above: 100}"
# One request runs at a time (0.1 s, 10/s); the queue depth is what waits behind it.
ONE_SLOT = ServerModel(drain_per_s=10.0, service_s=0.1)
A, H, SHED = Outcome.ADMITTED, Outcome.HELD, Outcome.OVERLOADED


@pytest.mark.parametrize(
    ("max_wait_ms", "expected"),
    [
        # The 1st runs, the 2nd is queued (depth 0 < admit_below 1 when it came). From the
        # 3rd on there is no room: with n ahead (depth - admit_below + 1, plus those held)
        # it would wait n x 0.1 s. No wait allowed: shed.
        (0, [A, A, SHED, SHED, SHED]),
        # 250 ms: the 3rd (0.1 s) and 4th (0.2 s) are held and go as requests complete (at
        # 0.1 s and 0.2 s, within their deadlines); the 5th (0.3 s) would wait too long.
        (250, [A, A, H, H, SHED]),
        # 450 ms: the 5th fits too, and goes at 0.3 s.
        (450, [A, A, H, H, H]),
    ],
)
def test_a_burst_on_a_busy_model_is_admitted_held_or_shed_by_the_predicted_wait(
    tmp_path: Path, max_wait_ms: int, expected: list[Outcome]
) -> None:
    policy = load_policy(
        [write_policy(tmp_path, burst=100, max_wait_ms=max_wait_ms, overload=OVERLOAD)]
    )
    assert ONE_SLOT.batch == 1
    arrivals = [Arrival(0.0, "acme", "interactive", "m") for _ in range(5)]
    assert replay(arrivals, policy, ONE_SLOT) == expected


def test_a_request_after_the_backlog_drained_is_admitted_at_once(tmp_path: Path) -> None:
    policy = load_policy([write_policy(tmp_path, burst=100, overload=OVERLOAD)])
    arrivals = [Arrival(0.0, "acme", None, "m") for _ in range(3)]
    arrivals.append(Arrival(0.1, "acme", None, "m"))  # the first completed at 0.1 s
    assert replay(arrivals, policy, ONE_SLOT) == [A, A, SHED, A]


def test_a_shed_after_a_hold_gives_back_its_bucket_charge(tmp_path: Path) -> None:
    # Three tokens and (almost) no refill. The 3rd request takes the last token and is to be
    # held, but the class holds nobody (max_queued 0): shed, and its token given back. The
    # 4th, after the first completed, finds that token; without the give-back it gets 429.
    overload = f"max_queued: 0\n    {OVERLOAD}"
    policy = load_policy(
        [write_policy(tmp_path, rate=0.001, burst=3, max_wait_ms=100, overload=overload)]
    )
    arrivals = [Arrival(0.0, "acme", None, "m") for _ in range(3)]
    arrivals.append(Arrival(0.1, "acme", None, "m"))
    assert replay(arrivals, policy, ONE_SLOT) == [A, A, SHED, A]
    arrivals.append(Arrival(0.2, "acme", None, "m"))  # and then the bucket is empty
    assert replay(arrivals, policy, ONE_SLOT)[-1] is Outcome.OVER_QUOTA


@pytest.mark.parametrize(
    ("grace_s", "second"),
    [
        # One request in flight at most; the first ends at 0.05 s. The second (at 0.01 s)
        # waits for that release when its grace reaches past it, else is 429 at once or
        # at the end of its grace.
        (0.0, Outcome.OVER_QUOTA),
        (0.02, Outcome.OVER_QUOTA),
        (0.1, Outcome.ADMITTED),
    ],
)
def test_a_request_over_concurrency_waits_its_grace_for_a_release(
    tmp_path: Path, grace_s: float, second: Outcome
) -> None:
    where = write_policy(tmp_path, burst=100)
    text = (where / "policy.yaml").read_text()
    text = text.replace(
        "on_disallowed_class: reject\n", "on_disallowed_class: reject\n    max_concurrency: 1\n"
    )
    (where / "policy.yaml").write_text(text)
    server = ServerModel(drain_per_s=20.0, service_s=0.05)
    arrivals = [Arrival(0.0, "acme", None, "m"), Arrival(0.01, "acme", None, "m")]
    assert replay(arrivals, load_policy([where]), server, grace_s) == [A, second]


def test_the_default_release_grace_is_the_sidecars() -> None:
    from sidecar.settings import Settings
    from sidecar.simulate.command import DEFAULT_RELEASE_GRACE_MS

    assert Settings.__dataclass_fields__["release_grace_ms"].default == DEFAULT_RELEASE_GRACE_MS


def test_a_shadow_bucket_is_replayed_as_enforced_unless_asked_as_written(tmp_path: Path) -> None:
    where = write_policy(tmp_path, rate=10, burst=5)
    text = (where / "policy.yaml").read_text().replace("burst: 5}", "burst: 5, enforce: false}")
    (where / "policy.yaml").write_text(text)
    policy = load_policy([where])
    arrivals = every(20, 1.0)
    # The sidecar enforces no shadow rule: everything is admitted.
    assert set(replay(arrivals, policy, IDLE_SERVER)) == {Outcome.ADMITTED}
    # As written the bucket applies: 5 + 10/s over 0.95 s admits 14.
    written = replay(arrivals, policy, IDLE_SERVER, as_written=True)
    assert written.count(Outcome.ADMITTED) == 14


TOKEN_MODEL = """
models:
  m:
    cost_per_request: 10
    tokens: {prompt_tokens: PROMPT_TOKENS, max_tokens: OUTPUT_TOKENS}
"""


def test_a_token_model_charges_each_request_its_estimate(tmp_path: Path) -> None:
    # A cost bucket of burst 1000 (and almost no refill): requests of 300 prompt + 100 max
    # tokens cost 400 each (weights 1), so two fit and the third is over; a request without
    # counts costs the model's cost_per_request (10) and still fits after them.
    where = write_policy(tmp_path, rate=0.001, burst=1000)
    text = (where / "policy.yaml").read_text().replace("unit: requests", "unit: cost")
    (where / "policy.yaml").write_text(text + TOKEN_MODEL)
    policy = load_policy([where])
    sized = [Arrival(0.0, "acme", None, "m", 300, 100) for _ in range(3)]
    plain = Arrival(0.0, "acme", None, "m")
    outcomes = replay([*sized, plain], policy, IDLE_SERVER)
    assert outcomes == [A, A, Outcome.OVER_QUOTA, A]


def test_the_server_drains_at_its_rate_and_serves_a_lone_request_in_its_time() -> None:
    server = ModelServer(ServerModel(drain_per_s=4.0, service_s=1.0))
    assert server.model.batch == 4
    done = [server.send(0.0) for _ in range(6)]
    assert done == [1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert server.signals().queue_depth == 2 and server.signals().in_flight == 6
    server.complete()
    assert server.signals().in_flight == 5


# -- Guards and the comparison ---------------------------------------------------------------


def test_guards_parse_by_the_documented_grammar() -> None:
    guard = parse_guard("shed_rate_increase_pts > 2")
    assert (guard.outcome, guard.increase, guard.op, guard.value) == ("shed", True, ">", 2.0)
    scoped = parse_guard("503_rate[class=interactive, tenant=*] >= 5.5")
    assert (scoped.outcome, scoped.increase, scoped.klass, scoped.tenant) == (
        "503",
        False,
        "interactive",
        "*",
    )
    for bad in ("shed > 2", "bogus_rate > 1", "shed_rate[who=x] > 1", "shed_rate = 1"):
        with pytest.raises(GuardError):
            parse_guard(bad)


def test_a_guard_fails_on_the_tenant_whose_rate_rose() -> None:
    arrivals = [Arrival(0.0, t, "c", "m") for t in ("a", "a", "b", "b")]
    current = [Outcome.ADMITTED] * 4
    proposed = [Outcome.ADMITTED, Outcome.OVER_QUOTA, Outcome.ADMITTED, Outcome.ADMITTED]
    rows = compare(arrivals, current, proposed)
    found = parse_guard("shed_rate_increase_pts > 2").violations(rows)
    assert [(row.tenant, value) for row, value in found] == [("a", 50.0)]
    assert parse_guard("shed_rate_increase_pts > 50").violations(rows) == []
    total = parse_guard("429_rate[tenant=*] >= 25").violations(rows)
    assert [(row.tenant, row.klass, value) for row, value in total] == [("*", "*", 25.0)]


# -- Readers --------------------------------------------------------------------------------

RECORDS = """\
system,run,tenant,class,scheduled_s,sent_s,status,ttfb_s,latency_s,retry_after_s,reason,error,prompt_tokens,output_tokens
passthrough,1x,a,interactive,0.0,0.0,200,0.1,0.1,,,,175,64
passthrough,1x,b,batch,1.0,1.0,200,0.1,0.1,,,,,
passthrough,2x,a,interactive,0.0,0.0,200,0.3,0.3,,,,1,1
passthrough,2x,a,interactive,0.0,0.0,200,0.3,0.3,,,,1,1
sidecar-http,1x,a,interactive,0.0,0.0,503,,0.01,1,overloaded,,1,1
"""


def test_records_give_one_runs_arrivals_and_the_backend_estimate(tmp_path: Path) -> None:
    path = tmp_path / "records.csv.gz"
    path.write_bytes(gzip.compress(RECORDS.encode()))
    recording = read_records(path, "llm", "passthrough", "1x")
    assert [(a.at_s, a.tenant, a.klass) for a in recording.arrivals] == [
        (0.0, "a", "interactive"),
        (1.0, "b", "batch"),
    ]
    tokens = [(a.prompt_tokens, a.output_tokens) for a in recording.arrivals]
    assert tokens == [(175, 64), (None, None)]
    # Run 1x: 2 served in 0.2 s busy (10/s); run 2x: 2 together in 0.3 s (6.7/s). The
    # highest is the capacity the recording shows.
    assert recording.drain_per_s() == pytest.approx(10.0)
    assert recording.service_s() == pytest.approx(0.1)  # the lone requests of run 1x
    with pytest.raises(TrafficError, match="several runs"):
        read_records(path, "llm", "passthrough")
    bad = tmp_path / "bad.csv"
    bad.write_text(RECORDS.replace("1.0,1.0,200", "soon,1.0,200"))
    with pytest.raises(TrafficError, match=r"bad.csv:3: scheduled_s"):
        read_records(bad, "llm", "passthrough", "1x")


def test_an_azure_trace_is_dealt_to_tenants_by_weight(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:17:0{i}.5000000,100,10" for i in range(6)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    mapping = parse_map("a/interactive=2, b=1")
    recording = read_azure(path, "llm", mapping)
    assert [a.at_s for a in recording.arrivals] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert {(a.prompt_tokens, a.output_tokens) for a in recording.arrivals} == {(100, 10)}
    assert [a.tenant for a in recording.arrivals].count("a") == 4
    assert {(a.tenant, a.klass) for a in recording.arrivals} == {("a", "interactive"), ("b", None)}
    assert deal(3, mapping) == deal(3, mapping)  # the same every time
    with pytest.raises(TrafficError, match="entry 2"):
        parse_map("a=1,b")


def test_the_access_log_reads_tenant_class_model_and_times(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    entries = [
        {
            "start_time": "100.000",
            "duration_ms": 50,
            "status": 200,
            "path": "/v2/models/m/infer",
            "tenant": "acme%20co",
            "class": "interactive",
        },
        {
            "start_time": "100.500",
            "duration_ms": 1,
            "status": 503,
            "path": "/v2/models/m/infer",
            "tenant": "acme%20co",
            "class": None,
        },
    ]
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    recording = read_access_log(path)
    assert [(a.at_s, a.tenant, a.klass, a.model) for a in recording.arrivals] == [
        (0.0, "acme co", "interactive", "m"),
        (0.5, "acme co", None, "m"),
    ]
    assert recording.statuses == ("200", "503")
    assert recording.service_s() == pytest.approx(0.05)
    path.write_text(json.dumps(entries[0]) + "\nnot json\n")
    with pytest.raises(TrafficError, match=r"access.log:2: not JSON"):
        read_access_log(path)


# -- The command ----------------------------------------------------------------------------


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def traffic(tmp_path: Path) -> Path:
    path = tmp_path / "access.log"
    lines = [
        json.dumps(
            {
                "start_time": f"{i / 20:.3f}",
                "duration_ms": 1,
                "status": 200,
                "path": "/v2/models/m/infer",
                "tenant": "acme",
                "class": "interactive",
            }
        )
        for i in range(20)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_passes_when_the_policies_agree(tmp_path: Path, traffic: Path) -> None:
    same = write_policy(tmp_path / "current")
    code, out, _ = run_cli(
        "simulate",
        traffic,
        "--current",
        same,
        "--proposed",
        same,
        "--drain-rate",
        "1000",
        "--fail-if",
        "shed_rate_increase_pts > 2",
    )
    assert code == 0, out
    assert "ok   shed_rate_increase_pts > 2" in out


def test_simulate_fails_a_guard_when_the_proposal_sheds_more(tmp_path: Path, traffic: Path) -> None:
    current = write_policy(tmp_path / "current", rate=100, burst=100)
    proposed = write_policy(tmp_path / "proposed", rate=10, burst=5)
    code, out, _ = run_cli(
        "simulate",
        traffic,
        "--current",
        current,
        "--proposed",
        proposed,
        "--drain-rate",
        "1000",
        "--fail-if",
        "shed_rate_increase_pts > 2",
        "--format",
        "json",
    )
    assert code == 1
    report = json.loads(out)
    total = next(r for r in report["rows"] if r["tenant"] == "*")
    assert total["current"]["counts"]["429"] == 0
    assert total["proposed"]["counts"]["429"] == 20 - 14  # burst 5 + 10/s over 0.95 s
    assert report["guards"][0]["violated"] is True


def test_simulate_exits_2_with_file_line_on_a_bad_policy(tmp_path: Path, traffic: Path) -> None:
    good = write_policy(tmp_path / "current")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "policy.yaml").write_text("classes:\n  x:\n    rank: zero\n")
    code, _, err = run_cli("simulate", traffic, "--current", good, "--proposed", bad)
    assert code == 2
    assert f"{bad / 'policy.yaml'}:3:" in err


def test_simulate_exits_2_on_bad_traffic_or_guard(tmp_path: Path, traffic: Path) -> None:
    good = write_policy(tmp_path / "current")
    code, _, err = run_cli(
        "simulate", traffic, "--current", good, "--proposed", good, "--fail-if", "shed > 1"
    )
    assert code == 2 and "--fail-if 'shed > 1'" in err
    broken = tmp_path / "broken.log"
    broken.write_text('{"start_time": "x"}\n')
    code, _, err = run_cli("simulate", broken, "--current", good, "--proposed", good)
    assert code == 2 and f"{broken}:1: start_time" in err


def test_traffic_errors_are_sidecar_errors() -> None:
    assert issubclass(TrafficError, SidecarError) and issubclass(GuardError, SidecarError)


def test_the_ci_example_runs_validate_and_simulate_with_flags_that_exist(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    workflow = yaml.safe_load((root / "examples" / "ci" / "policy-what-if.yml").read_text())
    assert workflow[True]["pull_request"]["paths"] == ["policies/**"]  # YAML 1.1: `on` is True
    steps = workflow["jobs"]["what-if"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    assert "qos-sidecar validate policies/" in script
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    known = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
    used = set(re.findall(r"--[a-z-]+", script.split("qos-sidecar simulate", 1)[1]))
    assert used and used <= known, used - known
    for guard in re.findall(r"--fail-if '([^']+)'", script):
        parse_guard(guard)


EXCESS = """\
identity:
  sources: [{kind: api_key, header: x-api-key}]
classes:
  interactive: {rank: 1, latency_objective_ms: 200, max_wait_ms: 0, triton_priority: 1}
  batch: {rank: 3, latency_objective_ms: 20000, max_wait_ms: 0, triton_priority: 3}
tenants:
  acme:
    match: {api_key_sha256: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]}
    allowed_classes: [interactive]
    default_class: interactive
    buckets:
    - {name: fast, unit: requests, rate: 0.01, burst: 2, classes: [interactive],
       excess_class: batch}
    - {name: slow, unit: requests, rate: 0.01, burst: 2, classes: [batch]}
"""


def test_what_a_bucket_refuses_is_replayed_in_its_excess_class(tmp_path: Path) -> None:
    """The what-if runs the excess rule as the sidecar does: the burst of the interactive
    bucket, then the batch bucket's as relegated, then 429."""
    (tmp_path / "policy.yaml").write_text(EXCESS)
    policy = load_policy([tmp_path])
    arrivals = [Arrival(0.0, "acme", "interactive", "m") for _ in range(5)]
    R, Q = Outcome.RELEGATED, Outcome.OVER_QUOTA
    assert replay(arrivals, policy, IDLE_SERVER) == [A, A, R, R, Q]


# acme of weight WEIGHT and another tenant of weight 1, no buckets, holds up to 1 s.
WEIGHTED = (
    BASE.replace("OVERLOAD", "overload: {admit_below: 1, shed_above: 1000}")
    .replace("MAX_WAIT", "1000")
    .replace("latency_objective_ms: 200", "latency_objective_ms: 5000")
).replace(
    "    buckets:\n    - {name: requests, unit: requests, rate: RATE, per: second, burst: BURST}\n",
    "    weight: WEIGHT\n"
    "  other:\n"
    f"    match: {{api_key_sha256: [{'b' * 64}]}}\n"
    "    allowed_classes: [interactive]\n"
    "    default_class: interactive\n",
)


@pytest.mark.parametrize(("weight", "served"), [(1, (6, 6)), (3, (9, 3))])
def test_held_turns_are_replayed_in_proportion_to_the_tenants_weights(
    tmp_path: Path, weight: int, served: tuple[int, int]
) -> None:
    """Two tenants alternate on a model that serves 10/s; a second of holds lets 12 go, shared
    by the tenants' weights (acme's `weight`, the other's 1), the rest shed."""
    (tmp_path / "policy.yaml").write_text(WEIGHTED.replace("WEIGHT", str(weight)))
    arrivals = [Arrival(0.01 * i, ("acme", "other")[i % 2], "interactive", "m") for i in range(40)]
    outcomes = replay(arrivals, load_policy([tmp_path]), ONE_SLOT)
    held = tuple(
        sum(1 for a, o in zip(arrivals, outcomes, strict=True) if a.tenant == t and o is H)
        for t in ("acme", "other")
    )
    assert held == served
