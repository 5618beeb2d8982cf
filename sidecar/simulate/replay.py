"""Replay arrivals through the admission core in virtual time, as `AdmissionService` and the
`Deferrer` drive it, with `quota.VirtualQuota` for the store and `backend.ModelServer` for
Triton.

Rules:
- Every step is the real one: `plan` (identity, class, cost), `judge` (the load verdict),
  `on_peek` / `on_quota` (the store's answer), `may_go` (the pump), `on_hold_end` (let go or
  expired). Only the I/O is replaced: the store by `VirtualQuota`, Triton by `ModelServer`,
  the clock by the replay's virtual time.
- The policy is decided as the sidecar enforces it: shadow rules (`enforce: false`,
  `core.shadow`) taken out; `as_written` applies every rule instead (what turning them on
  would do). Shadow judgements themselves are not replayed: they change no outcome.
- Identity: a recording names tenants, not their secrets, so each arrival is identified by
  its tenant NAME (a header source that matches policy tenant names); a name the policy
  does not know goes to the policy's `unknown_tenants` rule. The class asked for is sent in
  the policy's class header, as a client sends it.
- Events at the same instant: completions first (they free room and leases), then the ends
  of waits for a release, then hold deadlines, then the arrival. After each completion and
  each new hold the hold queues are pumped: their heads go while `may_go` says the model
  has room, as `Deferrer.pump` does.
- A request refused for concurrency waits up to `release_grace_s` for a release of its
  tenant (one release wakes one waiter, in arrival order) and tries again, as the service
  does; at the end of the grace its last answer stands.
- A request let go or admitted goes to its model's server; its lease is released when it
  completes. A request shed after a hold gives back its lease and bucket charges.
- Cost: a request for a model whose policy has `tokens`, with token counts in the recording,
  is priced by `core.tokens.estimate` on a JSON body that holds its prompt tokens (or that
  many characters' worth of text) and asks for its output tokens as max tokens, as ext_proc
  mode decides it; the estimate then equals what it generated, so no settlement follows.
  Without counts (or for another model) it costs the model's `cost_per_request`.
- Outcomes are final decisions: admitted at once, admitted after a hold, admitted as
  relegated, 429, 503, or another refusal (401, 403, 400, 404).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import json
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from sidecar.core import admission, tokens
from sidecar.core.admission import Answer, Hold, HoldOutcome, QuotaFirst, TakeQuota
from sidecar.core.compiled import CompiledPolicy, compile_policy
from sidecar.core.decide import refuse_unreadable
from sidecar.core.kserve import Unreadable
from sidecar.core.queue import HoldQueues, Waiter
from sidecar.core.shadow import compile_with_shadow
from sidecar.core.signals import Signals, may_go
from sidecar.core.types import Decision, Reason, RequestAttributes
from sidecar.policy.model import IdentitySource, IdentitySourceKind, Policy, TokenPolicy
from sidecar.simulate.backend import ModelServer, ServerModel
from sidecar.simulate.quota import VirtualQuota

# The header replay identifies tenants by (see the module comment); never sent anywhere.
TENANT_HEADER = "x-qos-simulated-tenant"


@dataclass(frozen=True, slots=True)
class Arrival:
    """One recorded request: when it came, who sent it, what it asked for."""

    at_s: float
    tenant: str  # the tenant's name
    klass: str | None  # the class asked for (None: the tenant's default)
    model: str
    # Token counts, when the recording has them: a model whose policy counts tokens is
    # charged the estimate of a body that asks for these (see `token_estimate`).
    prompt_tokens: int | None = None
    output_tokens: int | None = None


class Outcome(enum.Enum):
    ADMITTED = "admitted"
    HELD = "held"  # admitted after a hold
    RELEGATED = "relegated"  # admitted in its class's relegate_to class
    OVER_QUOTA = "429"
    OVERLOADED = "503"
    REFUSED = "refused"  # 401, 403, 400, 404: who or what, not how much


def outcome_of(decision: Decision) -> Outcome:
    if decision.admitted:
        if decision.reason is Reason.ADMITTED_RELEGATED:
            return Outcome.RELEGATED
        if decision.reason is Reason.ADMITTED_DEFERRED:
            return Outcome.HELD
        return Outcome.ADMITTED
    if decision.status == 429:
        return Outcome.OVER_QUOTA
    if decision.status == 503:
        return Outcome.OVERLOADED
    return Outcome.REFUSED


def compile_for_replay(policy: Policy) -> CompiledPolicy:
    """`policy` with tenants identified by name (see the module comment); nothing else
    changes: classes, limits and the unknown-tenant rule are the policy's."""
    source = IdentitySource(IdentitySourceKind.HEADER, TENANT_HEADER)
    # A tenant with no match is reached only through `unknown_tenants`: so it stays here.
    by_name = {
        name: tenant
        for name, tenant in policy.tenants.items()
        if tenant.match is not None
        and (tenant.match.api_key_sha256 or tenant.match.principals or tenant.match.header_values)
    }
    identity = replace(policy.identity, sources=(source,))
    compiled = compile_policy(replace(policy, identity=identity))
    return replace(compiled, by_api_key={}, by_principal={}, by_header_value=by_name)


def token_estimate(
    policy: TokenPolicy, prompt_tokens: int, output_tokens: int
) -> tokens.TokenEstimate | Unreadable:
    """What `core.tokens` estimates for a request of these counts (see the module comment)."""
    body: dict[str, object] = {}
    if policy.prompt_tokens is not None:
        body[policy.prompt_tokens] = prompt_tokens
    elif policy.prompt_text is not None:
        body[policy.prompt_text] = "x" * math.ceil(prompt_tokens * policy.chars_per_token)
    if policy.max_tokens is not None:
        body[policy.max_tokens] = output_tokens
    raw = json.dumps(body).encode()
    return tokens.priced(policy, tokens.estimate(policy, {"content-type": "application/json"}, raw))


class Replay:
    """One policy's run over one recording."""

    def __init__(
        self,
        policy: Policy,
        server: ServerModel,
        release_grace_s: float = 0.0,
        *,
        as_written: bool = False,
    ) -> None:
        # Decided as the sidecar decides: with the shadow rules (`enforce: false`) taken out,
        # unless asked to judge the policy as written (every rule applied).
        policy = policy if as_written else compile_with_shadow(policy).policy
        self.policy = policy
        self.compiled = compile_for_replay(policy)
        self.server = server
        self.release_grace_s = release_grace_s
        self.quota = VirtualQuota()
        self.servers: dict[str, ModelServer] = {}
        bounds = {name: klass.max_queued for name, klass in policy.classes.items()}
        self.queues = HoldQueues(0.0, bounds)
        self._holds: dict[int, tuple[Hold, int]] = {}  # waiter id -> (hold, arrival index)
        self._deadlines: list[tuple[float, int]] = []
        self._completions: list[tuple[float, int, str, str | None]] = []
        # Requests refused for concurrency that wait for a release of their tenant.
        self._waits: dict[int, tuple[TakeQuota, int, str]] = {}  # id -> (step, index, model)
        self._waits_of: dict[str, deque[int]] = {}  # tenant -> ids, in arrival order
        self._wait_ends: list[tuple[float, int]] = []
        self._ids = itertools.count(1)
        self.outcomes: list[Outcome | None] = []

    def run(self, arrivals: Iterable[Arrival]) -> list[Outcome]:
        """The final outcome of every arrival, in their order."""
        ordered = sorted(enumerate(arrivals), key=lambda pair: (pair[1].at_s, pair[0]))
        self.outcomes = [None] * len(ordered)
        for index, arrival in ordered:
            self._advance(arrival.at_s)
            self._arrive(index, arrival)
        self._advance(math.inf)
        return [o if o is not None else Outcome.REFUSED for o in self.outcomes]

    # -- time ---------------------------------------------------------------------------------

    def _advance(self, until_s: float) -> None:
        """Every completion, end of a wait for a release and hold deadline up to `until_s`, in
        time order (at one instant, in that order)."""
        while True:
            heads = [
                (first, kind)
                for kind, first in enumerate(
                    heap[0][0] if heap else math.inf
                    for heap in (self._completions, self._wait_ends, self._deadlines)
                )
            ]
            if min(heads)[0] == math.inf or min(heads)[0] > until_s:
                return
            at_s, kind = min(heads)
            if kind == 0:
                _, _, model, lease_id = heapq.heappop(self._completions)
                self.servers[model].complete()
                self._release(lease_id, at_s)
                self._pump(at_s)
            elif kind == 1:
                _, wait_id = heapq.heappop(self._wait_ends)
                self._try_again(wait_id, at_s)
            else:
                _, waiter_id = heapq.heappop(self._deadlines)
                self._expire(waiter_id, at_s)

    def _release(self, lease_id: str | None, now: float) -> None:
        """A lease ends: the tenant's first request waiting for a release tries again."""
        tenant = None if lease_id is None else self.quota.release(lease_id)
        waiting = self._waits_of.get(tenant or "")
        while waiting:
            wait_id = waiting.popleft()
            if wait_id in self._waits:
                self._try_again(wait_id, now)
                return

    # -- the steps ----------------------------------------------------------------------------

    def _arrive(self, index: int, arrival: Arrival) -> None:
        now = arrival.at_s
        headers = {TENANT_HEADER: arrival.tenant}
        if arrival.klass is not None:
            headers[self.policy.identity.class_header] = arrival.klass
        path = f"/v2/models/{arrival.model}/infer"
        cost: tuple[float, str] | None = None
        token_policy = self.policy.tokens_of(arrival.model)
        if token_policy is not None and arrival.prompt_tokens is not None:
            found = token_estimate(token_policy, arrival.prompt_tokens, arrival.output_tokens or 0)
            if isinstance(found, Unreadable):
                answer = Answer(refuse_unreadable(found))
                self._perform(index, answer, arrival.model, now)
                return
            cost = (found.cost, found.why)
        attrs = RequestAttributes("POST", path, headers)
        planned = admission.plan(attrs, self.compiled, cost)
        if isinstance(planned, Answer):
            self._perform(index, planned, arrival.model, now)
            return
        model = planned.model or arrival.model
        step: TakeQuota | QuotaFirst | Hold | Answer
        step = admission.judge(planned, self.signals(model, now), self.policy)
        if isinstance(step, QuotaFirst):
            step = admission.on_peek(step, self.quota.peek(step.admission.check, now))
        if isinstance(step, TakeQuota):
            self._take(index, step, model, now)
            return
        self._perform(index, step, model, now)

    def _take(self, index: int, take: TakeQuota, model: str, now: float) -> None:
        """The store's answer, then a hold, an answer, or a wait for a release (`on_quota`)."""
        result = self.quota.acquire(take.admission.check, now)
        signals = self.signals(model, now)
        step = admission.on_quota(take, result, now, self.release_grace_s, signals, self.policy)
        if isinstance(step, TakeQuota) and step.release_deadline_s is None:  # its excess class
            self._take(index, step, model, now)
        elif isinstance(step, TakeQuota):
            wait_id = next(self._ids)
            self._waits[wait_id] = (step, index, model)
            self._waits_of.setdefault(step.admission.tenant.name, deque()).append(wait_id)
            heapq.heappush(self._wait_ends, (step.release_deadline_s or now, wait_id))
        elif isinstance(step, Hold):
            self._hold(index, step, model, now)
        else:
            self._perform(index, step, model, now)

    def _try_again(self, wait_id: int, now: float) -> None:
        waiting = self._waits.pop(wait_id, None)
        if waiting is not None:  # else it already tried again after a release
            self._take(waiting[1], waiting[0], waiting[2], now)

    def _hold(self, index: int, hold: Hold, model: str, now: float) -> None:
        planned = hold.admission
        waiter = Waiter(
            next(self._ids),
            planned.tenant.name,
            planned.klass.name,
            planned.klass.rank,
            hold.deadline_s,
            planned.cost,
            model,
            client_cut=hold.client_cut,
            weight=planned.tenant.weight,
        )
        pushed = self.queues.push(waiter, now, displace=not planned.relegated)
        if pushed.displaced is not None:  # its hold ends as if its budget had passed
            self._expire(pushed.displaced.waiter_id, now, HoldOutcome.DISPLACED)
        if not pushed.queued:  # the class's queue is full, nothing to displace: over at once
            answer = admission.on_hold_end(
                hold, HoldOutcome.EXPIRED, self.signals(model, now), self.policy, 0.0
            )
            self._perform(index, answer, model, now)
            return
        self._holds[waiter.waiter_id] = (hold, index)
        heapq.heappush(self._deadlines, (hold.deadline_s, waiter.waiter_id))
        self._pump(now)

    def _expire(
        self, waiter_id: int, now: float, outcome: HoldOutcome = HoldOutcome.EXPIRED
    ) -> None:
        held = self._holds.pop(waiter_id, None)
        if held is None:  # let go before its deadline
            return
        hold, index = held
        waiter = self.queues.remove(waiter_id, expired=True)
        model = waiter.model if waiter is not None else hold.admission.model or ""
        answer = admission.on_hold_end(
            hold, outcome, self.signals(model, now), self.policy, now - hold.started_s
        )
        self._perform(index, answer, model, now)

    def _pump(self, now: float) -> None:
        """`Deferrer.pump`: let each model's head go while the model has room."""
        for model in self.queues.models():
            queue = self.queues.queue(model)
            while queue is not None and (waiter := queue.peek()) is not None:
                klass = self.policy.classes.get(waiter.klass)
                if not may_go(klass, self._server(model).signals()):
                    break
                self.queues.pop(model, now)
                hold, index = self._holds.pop(waiter.waiter_id)
                signals, held_s = self.signals(model, now), now - hold.started_s
                answer = admission.on_hold_end(
                    hold, HoldOutcome.LET_GO, signals, self.policy, held_s
                )
                self._perform(index, answer, model, now)
                queue = self.queues.queue(model)

    def _perform(self, index: int, answer: Answer, model: str, now: float) -> None:
        """The bookkeeping the service does with an answer: give back, or send to Triton."""
        decision = answer.decision
        if answer.give_back is not None:
            give_back = answer.give_back
            self.quota.refund(give_back.tenant, give_back.buckets, now)
            if give_back.lease is not None:
                self._release(give_back.lease.lease_id, now)
        if decision.admitted:
            done_s = self._server(model).send(now)
            heapq.heappush(self._completions, (done_s, next(self._ids), model, decision.lease_id))
        self.outcomes[index] = outcome_of(decision)

    # -- what a decision sees -----------------------------------------------------------------

    def _server(self, model: str) -> ModelServer:
        server = self.servers.get(model)
        if server is None:
            server = self.servers[model] = ModelServer(self.server)
        return server

    def signals(self, model: str, now: float) -> Signals:
        """`Deferrer.signals`: the model's load and this replay's waiters for it."""
        queue = self.queues.queue(model)
        here = None if queue is None else queue.ahead_view()
        paces = {} if queue is None else queue.paces(now)
        waiting = self.queues.waiting_by_rank(model)
        return Signals(self._server(model).signals(), waiting, None, here=here, paces=paces)


def replay(
    arrivals: Sequence[Arrival],
    policy: Policy,
    server: ServerModel,
    release_grace_s: float = 0.0,
    *,
    as_written: bool = False,
) -> list[Outcome]:
    return Replay(policy, server, release_grace_s, as_written=as_written).run(arrivals)
