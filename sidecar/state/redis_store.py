"""`RedisQuotaStore`: quota state shared by every replica, in Redis (or Valkey).

Rules:
- Every state change is one Lua script from `sidecar/state/lua/`, run atomically by the server
  with one EVALSHA: one round trip per acquire, release or charge (of any number of the
  tenant's buckets). Batched calls (`redis_pipelines.py`) carry many of one tenant in one
  call: acquire.lua judges its requests one after the other, release.lua frees its leases
  one by one, each as if alone. The one exception is a
  lease counted for a model: its model entry lives in another slot, so it takes a second
  script, `model_lease.lua`, right after the first (base.py says what can go wrong between
  them). The scripts use the server's clock (see `_prelude.lua`), so replicas with skewed
  clocks agree.
- Scripts are identified by the SHA-1 of their text, computed here; nothing is loaded at
  connect. The first EVALSHA on a server that does not know a script (fresh start, SCRIPT
  FLUSH, failover to a replica) gets NOSCRIPT; the store then runs it once with EVAL, which
  also caches it there. EVAL goes by the call's keys, so on a cluster it reaches the node
  that answered NOSCRIPT and only that one (SCRIPT LOAD would go to every primary, and fail
  while one of them is down).
- Three deployments (`mode`): one server (`single`, `url` is a Redis URL), a Redis Cluster
  (`cluster`, `url` lists seed nodes, `host:port` separated by commas; redis-py's cluster
  client finds the rest, routes each call by its hash tag, follows MOVED, and rereads the
  slot map after a connection error, which is how it finds a promoted replica), or a primary
  with replicas behind Sentinel (`sentinel`, `url` lists the sentinels, `sentinel_master`
  names the primary; a new connection asks the sentinels where the primary is). In `single`
  mode with a `redis://` or `unix://` URL, every call goes through the store's own pipelined
  connection (`redis_pipe.py`), about a sixth of redis-py's client cost per call.
- All keys of one script call carry one hash tag, the tenant's or the model's
  (`sidecar.state.keys`), and are passed in KEYS, so the scripts run unchanged against one
  shard of a Redis Cluster.
- Every call has one deadline, `timeout_s`, covering waiting for a pooled connection,
  connecting and the answer, and both scripts of an acquire or release of a model: the model
  step gets what the first left. Past it, or on any Redis or socket error, the call raises
  `StateUnavailable`; the core then applies the class's fail-open or fail-closed policy. A
  stalled Redis must never stall admission. redis-py's own retries are off: a retried script
  whose first answer was lost could charge twice, and the deadline leaves no time anyway.
- A failed model step never fails its acquire or release (see base.py for why): it is reported
  to `on_model_set_failure` (the app counts it in `qos_state_errors_total{operation=
  "model_lease"}`; a callback, so this layer imports nothing above it) and logged, at most
  once per `_LOG_EVERY_S`.
- A call cut short by the deadline may still have run on the server. A lease taken that way is
  never handed out and expires with its TTL; that is the price of not waiting.
- A connection error (the server closed the connection, or refused a new one) is retried once,
  within the same deadline, after dropping every idle pooled connection: after a restart every
  connection pooled before it is dead, and without this each would fail one call. Only scripts
  that are safe to run twice are retried: release, renew, peek, in-flight counts, model steps,
  heartbeats, and acquire, because an acquire always carries its lease id: if the first attempt
  did run, the retry finds the id held and takes nothing (`LEASE_ID_USED`), which this store
  then reports as the first error (the caller owes a release, as for any failed acquire), so a
  retry can never charge twice. `charge` is not retried: it has no id and would charge twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from sidecar.core.fleet import CounterOp, counter_field, parse_counter_field
from sidecar.core.types import BucketCheck, LeaseRef, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.state.base import (
    DEFAULT_TOMBSTONE_S,
    FleetState,
    new_lease_id,
    validate_buckets_only,
    validate_charge,
    validate_check,
    validate_lease,
    validate_tenant,
)
from sidecar.state.keys import (
    FLEET_FAIR_KEY,
    FLEET_WAITING_KEY,
    HEARTBEATS_KEY,
    KeyKind,
    build_key,
    build_model_key,
)
from sidecar.state.redis_client import make_client
from sidecar.state.redis_pipe import RedisPipe
from sidecar.state.redis_pipelines import (
    Pipelines,
    acquire_call,
    acquire_result,
    indexes_by,
    map_exceptions,
    model_keys,
    model_set_key,
    release_call,
    renew_call,
    script_command,
)
from sidecar.state.scripts import (
    ACQUIRE,
    CHARGE,
    FLEET,
    HEARTBEAT,
    IN_FLIGHT,
    MODEL_LEASE,
    LuaScript,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.05
# A shard that fails every model step would otherwise log once per request.
_LOG_EVERY_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64


class RedisQuotaStore(Pipelines):
    """Quota state in Redis at `url`: a `redis://`, `rediss://` or `unix://` URL in `single`
    mode, seeds `host:port,...` in `cluster` and `sentinel` modes (see module rules).

    `timeout_s` bounds every call (see module rules). `max_connections` caps the pool; a call
    finding every connection busy waits for one within the same deadline. Nothing connects
    until the first call; `ping()` checks reachability. `on_model_set_failure()` is called
    for each model step that failed without failing its call (see module rules).
    """

    def __init__(
        self,
        url: str,
        *,
        mode: str = "single",
        sentinel_master: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        on_model_set_failure: Callable[[], None] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        self._timeout_s = timeout_s
        self._client, self._finders = make_client(
            url, mode, sentinel_master, timeout_s, max_connections
        )
        self._pipe = RedisPipe.for_url(url) if mode == "single" else None
        self._on_model_set_failure = on_model_set_failure
        self._unlogged_failures = 0
        self._last_failure_log = -_LOG_EVERY_S

    async def acquire(self, check: QuotaCheck) -> QuotaResult:
        """Raises StateUnavailable, or ValueError for an invalid check."""
        return await self._evaluate(check, take=True)

    async def peek(self, check: QuotaCheck) -> QuotaResult:
        """Raises StateUnavailable, or ValueError for an invalid check."""
        return await self._evaluate(check, take=False)

    async def take_buckets(self, check: QuotaCheck) -> QuotaResult:
        """Raises StateUnavailable, or ValueError for an invalid check or one with a
        concurrency limit."""
        validate_buckets_only(check)
        keys, args = acquire_call([(check, "")], take=True, lease=False)
        # A retried charge that ran twice charged twice: tokens lost (under-admission for
        # one slice), never gained. The result is never None: no lease id to find held.
        (reply,) = await self._run(ACQUIRE, keys, args)
        result = acquire_result(check, "", reply)
        assert result is not None
        return result

    async def release(self, lease: LeaseRef, *, tombstone_s: float = DEFAULT_TOMBSTONE_S) -> bool:
        """Raises StateUnavailable (for the tenant's lease only, or a model-only lease's
        entry), or ValueError for a lease no store could hold (`validate_lease`)."""
        validate_lease(lease)
        deadline = self._deadline()
        if lease.model_only:  # its model's entry is all it holds (module rules of base)
            remove: list[str | float] = ["remove", tombstone_s, lease.lease_id]
            keys = model_keys(model_set_key(lease))
            return bool((await self._run(MODEL_LEASE, keys, remove, deadline))[0])
        script, keys, args = release_call(lease.tenant, [lease], tombstone_s)
        model_key = None if lease.model is None else model_set_key(lease)
        try:
            (held,) = await self._run(script, keys, args, deadline)
        except StateUnavailable:
            # The request has left the model whether or not its tenant's lease could be
            # freed, so its model entry is still removed if that shard answers.
            if model_key is not None:
                await self._update_model_set(
                    "remove", model_key, lease.lease_id, deadline, tombstone_s
                )
            raise
        if model_key is not None:
            await self._update_model_set("remove", model_key, lease.lease_id, deadline, tombstone_s)
        return bool(held)

    async def renew(self, tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> set[str]:
        """Raises StateUnavailable (for the tenant's sets, and for a model's set that holds a
        model-only lease: all that lease holds), or ValueError for an empty tenant."""
        validate_tenant(tenant)
        deadline = self._deadline()
        held = [lease for lease in leases if not lease.model_only]
        gone: set[str] = set()
        if held:
            gone = {_text(i) for i in await self._run(*renew_call(tenant, held, ttl_s), deadline)}
        by_model = indexes_by(None if x.model is None else model_set_key(x) for x in leases)
        for model_key, indexes in by_model.items():
            ids = [leases[i].lease_id for i in indexes if leases[i].lease_id not in gone]
            only = {leases[i].lease_id for i in indexes if leases[i].model_only}
            if not only:
                await self._update_model_set("renew", model_key, "", deadline, ttl_s, ids)
            elif ids:  # a model-only lease is gone when its model's entry is
                renew: list[str | float] = ["renew", ttl_s, *ids]
                reply = await self._run(MODEL_LEASE, model_keys(model_key), renew, deadline)
                gone |= only & {_text(i) for i in reply}
        return {lease.lease_id for lease in leases if lease.lease_id not in gone}

    async def charge(self, tenant: str, buckets: Sequence[BucketCheck]) -> None:
        """Raises StateUnavailable, or ValueError for an invalid charge."""
        validate_charge(tenant, buckets)
        if not buckets:
            return
        keys = [build_key(tenant, KeyKind.BUCKET, bucket.name) for bucket in buckets]
        args = [arg for bucket in buckets for arg in (bucket.rate_per_s, bucket.cost)]
        await self._run(CHARGE, keys, args, retry=False)  # not idempotent: see module rules

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        """Raises StateUnavailable."""
        return int(await self._run(HEARTBEAT, [HEARTBEATS_KEY], [replica, ttl_s]))

    async def fleet_exchange(
        self, replica: str, ttl_s: float, summary: str, ops: Sequence[CounterOp]
    ) -> FleetState:
        """Raises StateUnavailable. Not retried: counter increments are not idempotent."""
        args: list[str | float] = [replica, ttl_s, summary]
        for kind, rank, tenant, value in ops:
            args += [counter_field(rank, tenant), kind, value]
        keys = [FLEET_WAITING_KEY, FLEET_FAIR_KEY]
        others, fields = await self._run(FLEET, keys, args, retry=False)
        counters: dict[tuple[int, str], float] = {}
        for name, value in zip(fields[::2], fields[1::2], strict=True):
            parsed = parse_counter_field(_text(name))
            if parsed is not None:
                counters[parsed] = float(value)
        pairs = zip(others[::2], others[1::2], strict=True)
        return FleetState([(_text(name), _text(text)) for name, text in pairs], counters)

    async def in_flight(self, tenant: str, klass: str | None) -> int:
        """Raises StateUnavailable."""
        if klass is None:
            key = build_key(tenant, KeyKind.LEASES)
        else:
            key = build_key(tenant, KeyKind.CLASS_LEASES, klass)
        return int(await self._run(IN_FLIGHT, [key], []))

    async def count_for_model(self, lease: LeaseRef, ttl_s: float) -> None:
        """Never raises StateUnavailable (a failure is counted, see module rules); ValueError
        for a lease without a model."""
        if not lease.model:
            raise ValueError("count_for_model needs a lease with a model")
        await self._update_model_set(
            "add", model_set_key(lease), lease.lease_id, self._deadline(), ttl_s
        )

    async def model_in_flight(self, model: str, pod: str | None = None) -> int:
        """Raises StateUnavailable, or ValueError for an empty model or pod."""
        return int(await self._run(IN_FLIGHT, [build_model_key(model, pod)], []))

    async def ping(self) -> None:
        """Raises StateUnavailable."""
        with map_exceptions("ping", self._timeout_s):
            async with asyncio.timeout(self._timeout_s):
                if self._pipe is None:
                    await self._client.ping()
                    return
                (reply,) = await self._pipe.execute([("PING",)])
                if isinstance(reply, Exception):
                    raise reply

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.aclose()
        await self._client.aclose()
        for finder in self._finders:
            await finder.aclose()

    async def _evaluate(self, check: QuotaCheck, *, take: bool) -> QuotaResult:
        validate_check(check)
        deadline = self._deadline()
        lease_id = (check.lease_id or new_lease_id()) if take else ""
        keys, args = acquire_call([(check, lease_id)], take=take)
        retried: list[BaseException] = []
        (reply,) = await self._run(ACQUIRE, keys, args, deadline, retried=retried)
        result = acquire_result(check, lease_id, reply, retried=bool(retried) and take)
        if result is None:  # the lost first attempt ran after all (see acquire_result)
            raise StateUnavailable(f"redis acquire: {retried[0]}") from retried[0]
        if result.allowed and take and check.model is not None and check.count_model_now:
            model_key = build_model_key(check.model, check.model_pod)
            await self._update_model_set("add", model_key, lease_id, deadline, check.lease_ttl_s)
        return result

    async def _update_model_set(
        self,
        operation: str,
        model_key: str,
        lease_id: str,
        deadline: float,
        ttl_s: float = 0.0,
        renew_ids: Sequence[str] = (),
    ) -> None:
        """Add the lease to the model's set ("add", `ttl_s` its TTL), remove it ("remove",
        `ttl_s` its tombstone's), or renew `renew_ids` there ("renew"). Never raises
        StateUnavailable: a failure is counted and logged (see module rules)."""
        args: list[str | float] = [operation, ttl_s, lease_id]  # "add"; "remove": tombstone_s
        if operation == "renew":
            args = [operation, ttl_s, *renew_ids]
        try:
            await self._run(MODEL_LEASE, model_keys(model_key), args, deadline)
        except StateUnavailable as exc:
            self._model_set_failed(operation, model_key, exc)

    def _model_set_failed(self, operation: str, model_key: str, error: BaseException) -> None:
        """Count and (at most once per `_LOG_EVERY_S`) log a model step that failed."""
        if self._on_model_set_failure is not None:
            self._on_model_set_failure()
        self._unlogged_failures += 1
        now = time.monotonic()
        if now - self._last_failure_log >= _LOG_EVERY_S:
            log.warning(
                "model lease set not updated, %d time(s) since the last report (each "
                "leaves the model's in-flight count off by one, for at most a lease TTL); "
                "latest: %s %r: %s",
                self._unlogged_failures,
                operation,
                model_key,
                error,
            )
            self._last_failure_log, self._unlogged_failures = now, 0

    def _deadline(self) -> float:
        """When a call started now must have its answer, on the event loop's clock."""
        return asyncio.get_running_loop().time() + self._timeout_s

    async def _run(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[str | float],
        deadline: float | None = None,
        *,
        retry: bool = True,
        retried: list[BaseException] | None = None,
    ) -> Any:
        """Run `script`, retrying once on a connection error when `retry` (see module rules);
        the error that caused a retry is appended to `retried`."""
        if deadline is None:
            deadline = self._deadline()
        with map_exceptions(script.name, self._timeout_s):
            async with asyncio.timeout_at(deadline):
                try:
                    return await self._evalsha(script, keys, args)
                except RedisConnectionError as exc:
                    if not retry:
                        raise
                    # Idle pooled connections are as old as the one that failed: drop them,
                    # so the retry (and every later call) connects afresh. The cluster client
                    # has done that for the failed node, and rereads the slot map.
                    await self._forget_idle()
                    if retried is not None:
                        retried.append(exc)
                    return await self._evalsha(script, keys, args)

    async def _evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._pipe is not None:
            call = (script, list(keys), list(args))
            (reply,) = await self._pipe.execute([script_command(call)])
            if isinstance(reply, NoScriptError):  # EVAL caches it (module rules)
                (reply,) = await self._pipe.execute([script_command(call, source=True)])
            if isinstance(reply, Exception):
                raise reply
            return reply
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # EVAL caches it where the keys live (module rules)
            return await self._client.eval(script.source, len(keys), *keys, *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
