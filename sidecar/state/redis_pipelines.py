"""The Redis store's pipelined calls (a mixin of `RedisQuotaStore`, whose module rules hold
here too): many scripts in one round trip, for the periodic counts and for releases.

- A pipeline is not a transaction (MULTI would need every key in one slot): each script in it
  is atomic on its own, which is all each needs. Every script touches keys of one slot, so a
  cluster client splits the pipeline by node: one round trip per node.
- NOSCRIPT on a node: EVAL the source there for the scripts that got it (module rules).
- The deadline grows with the batch (`_PER_ITEM_S` a script): it still bounds a stalled server,
  while a read of thousands of counts does not fail against a budget sized for one decision.
- One exception family: whatever the client raises becomes `StateUnavailable` here
  (`map_exceptions`, used by the whole store).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ClusterDownError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.core.types import LeaseRef, LimitKind, QuotaCheck, QuotaResult
from sidecar.errors import StateUnavailable
from sidecar.state.base import (
    DEFAULT_TOMBSTONE_S,
    validate_check,
    validate_lease,
    validate_tenant,
)
from sidecar.state.keys import KeyKind, build_key, build_model_key, model_tombstones_key
from sidecar.state.redis_pipe import RedisPipe
from sidecar.state.scripts import ACQUIRE, IN_FLIGHT, MODEL_LEASE, RELEASE, RENEW, LuaScript

# What one more script adds to the deadline of a pipelined call: about 4x what the server and
# client take for one (a count: about 12 us on a local Valkey).
_PER_ITEM_S = 50e-6

# One script call in a pipeline: the script, its keys, its args.
Call = tuple[LuaScript, list[str], list[str | float]]

# Requests or leases one acquire.lua, release.lua or model_lease.lua call judges, frees (or
# counts) at most: a burst of decisions, completions or admits costs the server one script's
# fixed cost per this many, and one call still holds the server for well under a millisecond
# (about 4 commands a request or lease at most, beyond the call's own).
LEASES_PER_CALL = 64


@contextlib.contextmanager
def map_exceptions(operation: str, timeout_s: float) -> Iterator[None]:
    """Turn whatever the Redis client raises into StateUnavailable, in this one place."""
    try:
        yield
    except TimeoutError as exc:  # our deadline (redis-py's own TimeoutError is a RedisError)
        raise StateUnavailable(
            f"redis {operation}: no answer within {timeout_s * 1000:.0f} ms"
        ) from exc
    except (RedisError, OSError) as exc:
        raise StateUnavailable(f"redis {operation}: {type(exc).__name__}: {exc}") from exc
    except AttributeError as exc:
        # redis-py's cluster client can drop a dead node's connection while another call is
        # still writing on it ('NoneType' object has no attribute 'writelines', seen once in
        # about 8 failovers). Only an error raised inside redis-py itself means that; one of
        # ours is a bug and propagates.
        if not _raised_in_redis_py(exc):
            raise
        raise StateUnavailable(f"redis {operation}: connection lost: {exc}") from exc


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback is redis-py's code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] == "redis"


_DENIED_BY = {
    1: LimitKind.CLASS_CONCURRENCY,
    2: LimitKind.CONCURRENCY,
    3: LimitKind.BUCKET,
    4: LimitKind.LEASE_ID_USED,
}


def acquire_call(
    requests: Sequence[tuple[QuotaCheck, str]], *, take: bool, lease: bool = True
) -> tuple[list[str], list[Any]]:
    """acquire.lua's keys and args for `requests`, each a check and its lease id, all of one
    tenant (a peek: `take` False, no lease id; the buckets only: `lease` False)."""
    tenant = requests[0][0].tenant
    keys = [build_key(tenant, KeyKind.LEASES), build_key(tenant, KeyKind.RELEASED)]
    args: list[Any] = [("acquire" if lease else "charge") if take else "peek"]
    for check, lease_id in requests:
        if check.tenant != tenant:
            raise ValueError("one acquire.lua call judges the requests of one tenant")
        keys.append(build_key(tenant, KeyKind.CLASS_LEASES, check.klass))
        args += (
            lease_id,
            check.lease_ttl_s,
            "" if check.max_concurrency is None else str(check.max_concurrency),
            "" if check.max_class_concurrency is None else str(check.max_class_concurrency),
            len(check.buckets),
        )
        for bucket in check.buckets:
            keys.append(build_key(tenant, KeyKind.BUCKET, bucket.name))
            args += (bucket.rate_per_s, bucket.burst, bucket.cost)
    return keys, args


def acquire_result(
    check: QuotaCheck, lease_id: str, reply: Any, *, retried: bool = False
) -> QuotaResult | None:
    """acquire.lua's reply as a QuotaResult; None when a retried acquire finds its own id
    held: the lost first attempt ran after all, its lease exists but its answer is gone."""
    allowed, denied_code, bucket_index, retry_after, in_flight, class_in_flight = reply
    if allowed:
        return QuotaResult(
            allowed=True,
            lease_id=lease_id or None,
            in_flight=int(in_flight),
            class_in_flight=int(class_in_flight),
        )
    denied_by = _DENIED_BY[int(denied_code)]
    if retried and denied_by is LimitKind.LEASE_ID_USED:
        return None
    return QuotaResult(
        allowed=False,
        denied_by=denied_by,
        denied_bucket=(
            check.buckets[int(bucket_index) - 1].name if denied_by is LimitKind.BUCKET else None
        ),
        retry_after_s=float(retry_after),
        in_flight=int(in_flight),
        class_in_flight=int(class_in_flight),
    )


def _class_set(tenant: str, klass: str, keys: list[str], index: dict[str, int]) -> int:
    """The position in Lua's 1-based KEYS of `klass`'s lease set, appended to `keys` the
    first time a call names it (`index`: class -> position so far)."""
    if klass not in index:
        keys.append(build_key(tenant, KeyKind.CLASS_LEASES, klass))
        index[klass] = len(keys)
    return index[klass]


def release_call(tenant: str, leases: Sequence[LeaseRef], tombstone_s: float) -> Call:
    """release.lua's keys and args for `leases`, all of `tenant` (their sets share one slot)."""
    keys = [build_key(tenant, KeyKind.LEASES), build_key(tenant, KeyKind.RELEASED)]
    args: list[str | float] = [tombstone_s]
    index: dict[str, int] = {}
    for lease in leases:
        args += (lease.lease_id, _class_set(tenant, lease.klass, keys, index))
    return RELEASE, keys, args


def renew_call(tenant: str, leases: Sequence[LeaseRef], ttl_s: float) -> Call:
    """renew.lua's keys and args for `leases`, all of `tenant`."""
    keys = [build_key(tenant, KeyKind.LEASES)]
    args: list[str | float] = [ttl_s]
    index: dict[str, int] = {}
    for lease in leases:
        args += (lease.lease_id, _class_set(tenant, lease.klass, keys, index))
    return RENEW, keys, args


def indexes_by(keys: Iterable[str | None]) -> dict[str, list[int]]:
    """The positions of each key in `keys`, None skipped: the leases of one script call."""
    found: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            found.setdefault(key, []).append(i)
    return found


def _chunks(by_key: dict[str, list[int]]) -> Iterator[tuple[str, list[int]]]:
    """Each key's indexes, LEASES_PER_CALL at most at a time."""
    for key, indexes in by_key.items():
        for start in range(0, len(indexes), LEASES_PER_CALL):
            yield key, indexes[start : start + LEASES_PER_CALL]


class Pipelines:
    _client: Redis | RedisCluster
    _pipe: RedisPipe | None  # single mode's own connection (redis_pipe.py), else redis-py
    _timeout_s: float

    def _model_set_failed(self, operation: str, model_key: str, error: BaseException) -> None:
        raise NotImplementedError  # RedisQuotaStore: counted and logged (module rules)

    async def acquire_many(self, checks: Sequence[QuotaCheck]) -> list[QuotaResult | None]:
        """Every check's `acquire`, in one pipeline: one acquire.lua call per tenant (at most
        LEASES_PER_CALL checks each), which judges its checks one after the other, each all or
        nothing as if alone (each call atomic on its own: module rules). Per check its
        result, or None if its call failed (the caller owes a release of its lease id).
        Lease ids must be set. The model step of a check that asks for it
        (`count_model_now`) follows in one more pipeline. Raises StateUnavailable when the
        whole call failed, or ValueError for a bad check."""
        for check in checks:
            validate_check(check)
            if not check.lease_id:
                raise ValueError("acquire_many needs checks with lease ids")
        # One call per tenant (LEASES_PER_CALL requests at most): its keys share one slot.
        chunks = list(_chunks(indexes_by(check.tenant for check in checks)))
        calls: list[Call] = [
            (
                ACQUIRE,
                *acquire_call([(checks[i], checks[i].lease_id or "") for i in chunk], take=True),
            )
            for _, chunk in chunks
        ]
        retried: list[bool] = []
        replies = await self._run_many("acquire_many", calls, retried, items=len(checks))
        results: list[QuotaResult | None] = [None] * len(checks)
        for (_, chunk), reply in zip(chunks, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # each of its checks failed
            for i, answer in zip(chunk, reply, strict=True):
                check = checks[i]
                results[i] = acquire_result(
                    check, check.lease_id or "", answer, retried=bool(retried)
                )
        counted = [
            LeaseRef.of(c, c.lease_id or "")
            for c, r in zip(checks, results, strict=True)
            if r is not None and r.allowed and c.model is not None and c.count_model_now
        ]
        if counted:
            await self.count_for_model_many(counted, max(c.lease_ttl_s for c in checks))
        return results

    async def release_many(
        self, leases: Sequence[LeaseRef], *, tombstone_s: float = DEFAULT_TOMBSTONE_S
    ) -> list[bool | None]:
        """Every lease's `release` (release.lua, and the removal from its model's set) in one
        pipeline: one round trip, however many leases (per node on a cluster), and one script
        call per tenant and per model set (LEASES_PER_CALL leases at most each). Per lease:
        True if it was held, False if not, None if its release failed (the caller owes it).
        A model-only lease is held in its model's set alone: that set's call is its release.
        Raises StateUnavailable when the whole call failed, or ValueError for a lease no
        store could hold (`validate_lease`)."""
        for lease in leases:
            validate_lease(lease)
        by_model = indexes_by(None if x.model is None else model_set_key(x) for x in leases)
        by_tenant = indexes_by(None if x.model_only else x.tenant for x in leases)
        tenant_chunks = list(_chunks(by_tenant))
        calls = [
            release_call(tenant, [leases[i] for i in chunk], tombstone_s)
            for tenant, chunk in tenant_chunks
        ]
        model_chunks = list(_chunks(by_model))
        model_calls: list[Call] = [
            (
                MODEL_LEASE,
                model_keys(key),
                ["remove", tombstone_s, *(leases[i].lease_id for i in chunk)],
            )
            for key, chunk in model_chunks
        ]
        counted = sum(len(chunk) for chunk in by_model.values())
        replies = await self._run_many(
            "release_many", [*calls, *model_calls], items=len(leases) + counted
        )
        held: list[bool | None] = [None] * len(leases)
        for (key, chunk), reply in zip(model_chunks, replies[len(calls) :], strict=True):
            if isinstance(reply, Exception):
                self._model_set_failed("remove", key, reply)
                continue
            for i, answer in zip(chunk, reply, strict=True):
                if leases[i].model_only:
                    held[i] = bool(answer)
        for (_, chunk), reply in zip(tenant_chunks, replies[: len(calls)], strict=True):
            if not isinstance(reply, Exception):
                for i, answer in zip(chunk, reply, strict=True):
                    held[i] = bool(answer)
        return held

    async def count_for_model_many(self, leases: Sequence[LeaseRef], ttl_s: float) -> None:
        """Every lease's entry added to its model's set, in one pipeline: one script call per
        model set (LEASES_PER_CALL leases at most each). Never raises StateUnavailable: a
        failure is counted and logged (module rules of redis_store)."""
        if not all(lease.model for lease in leases):
            raise ValueError("count_for_model needs a lease with a model")
        by_model = indexes_by(model_set_key(lease) for lease in leases)
        calls: list[Call] = [
            (MODEL_LEASE, model_keys(key), ["add", ttl_s, *(leases[i].lease_id for i in chunk)])
            for key, chunk in _chunks(by_model)
        ]
        try:
            replies = await self._run_many("count_for_model_many", calls, items=len(leases))
        except StateUnavailable as exc:
            replies = [exc] * len(calls)
        for (_, keys, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                self._model_set_failed("add", keys[0], reply)

    async def in_flight_many(
        self, pairs: Sequence[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        """Raises StateUnavailable, or ValueError for an empty tenant."""
        unique = list(dict.fromkeys(pairs))
        for tenant, _ in unique:
            validate_tenant(tenant)
        keys = [
            build_key(tenant, KeyKind.LEASES)
            if klass is None
            else build_key(tenant, KeyKind.CLASS_LEASES, klass)
            for tenant, klass in unique
        ]
        return dict(zip(unique, await self._count_many(keys), strict=True))

    async def model_in_flight_many(
        self, models: Sequence[str], pod: str | None = None
    ) -> dict[str, int]:
        """Raises StateUnavailable, or ValueError for an empty model or pod."""
        unique = list(dict.fromkeys(models))
        keys = [build_model_key(model, pod) for model in unique]
        return dict(zip(unique, await self._count_many(keys), strict=True))

    async def _count_many(self, keys: Sequence[str]) -> list[int]:
        """`in_flight.lua` on each key, in one pipeline (module rules). Raises
        StateUnavailable if any count failed: a gauge or a load signal is read whole."""
        replies = await self._run_many("in_flight_many", [(IN_FLIGHT, [key], []) for key in keys])
        for reply in replies:
            if isinstance(reply, Exception):
                with map_exceptions("in_flight_many", self._timeout_s):
                    raise reply
        return [int(reply) for reply in replies]

    async def _run_many(
        self,
        operation: str,
        calls: Sequence[Call],
        retried: list[bool] | None = None,
        items: int | None = None,
    ) -> list[Any]:
        """Each call's reply, or the exception it got, from one pipeline under one deadline
        (module rules). Raises StateUnavailable when the pipeline itself failed. `retried`
        gets True appended when the pipeline was sent a second time. `items`: how many items
        the calls carry in all, where a call carries more than one (the deadline grows with
        them), else one a call."""
        if not calls:
            return []
        timeout_s = self._timeout_s + (items or len(calls)) * _PER_ITEM_S
        with map_exceptions(operation, timeout_s):
            async with asyncio.timeout(timeout_s):
                try:
                    replies = await self._pipeline(calls)
                except RedisConnectionError:
                    # As `_run` does (module rules of redis_store): connections pooled before
                    # a restart are dead; drop the idle ones and send once more. Every script
                    # sent this way is safe to run twice (an acquire carries its lease id).
                    await self._forget_connections()
                    if retried is not None:
                        retried.append(True)
                    replies = await self._pipeline(calls)
                lost = [i for i, reply in enumerate(replies) if _connection_lost(reply)]
                if lost:
                    # A cluster pipeline keeps a dead node's connection errors as replies and,
                    # unlike a single command, does not reread the slot map: without this, a
                    # killed primary's slots would fail every pipeline until a restart.
                    await self._forget_connections()
                    if retried is not None:
                        retried.append(True)
                    again = await self._pipeline([calls[i] for i in lost])
                    for i, reply in zip(lost, again, strict=True):
                        replies[i] = reply
                unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if unknown:  # EVAL on the keys of the nodes that lacked it (module rules)
                    again = await self._pipeline([calls[i] for i in unknown], source=True)
                    for i, reply in zip(unknown, again, strict=True):
                        replies[i] = reply
        return replies

    async def _forget_connections(self) -> None:
        """Drop the connections a failure may have left dead: one server's idle pool; on a
        cluster, everything, so that the next call reads the slot map again (what redis-py's
        cluster pipeline does itself when it raises)."""
        if isinstance(self._client, Redis):
            await self._forget_idle()
        else:
            await self._client.aclose()

    async def _forget_idle(self) -> None:
        """One server: its connection and every idle pooled connection, as old as the one
        that failed, are dropped; the next call connects afresh."""
        if self._pipe is not None:
            self._pipe.drop()
        if isinstance(self._client, Redis):
            await self._client.connection_pool.disconnect(inuse_connections=False)

    async def _pipeline(self, calls: Sequence[Call], *, source: bool = False) -> list[Any]:
        """EVALSHA (EVAL when `source`) of each call, in one pipeline."""
        if self._pipe is not None:
            return await self._pipe.execute([script_command(call, source) for call in calls])
        async with self._client.pipeline(transaction=False) as pipe:
            for call in calls:
                # Not `pipe.evalsha`: redis-py's cluster pipeline refuses that helper (for its
                # NOSCRIPT handling, which `_run_many` does itself); the command routes by
                # its keys (one slot) like any other.
                pipe.execute_command(*script_command(call, source))
            return list(await pipe.execute(raise_on_error=False))


def script_command(call: Call, source: bool = False) -> tuple[Any, ...]:
    """The EVALSHA (EVAL when `source`) command of one script call."""
    script, keys, args = call
    name, body = ("EVAL", script.source) if source else ("EVALSHA", script.sha)
    return (name, body, len(keys), *keys, *args)


def model_keys(model_key: str) -> list[str]:
    """model_lease.lua's keys for the model set `model_key`: the set, its tombstones."""
    return [model_key, model_tombstones_key(model_key)]


def model_set_key(lease: LeaseRef) -> str:
    """The model set `lease` is counted in (it has a model): the pod's or the fleet's."""
    assert lease.model is not None
    return build_model_key(lease.model, lease.model_pod)


def _connection_lost(reply: Any) -> bool:
    """A reply that is the error of a connection lost or refused (a dead node), not the
    script's own."""
    return isinstance(reply, (RedisConnectionError, RedisTimeoutError, ClusterDownError))
