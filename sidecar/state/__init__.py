"""Where quota state lives: Redis for a fleet of replicas, memory for a single one.

`QuotaStore` (base.py) is the interface and its rules; `RedisQuotaStore` keeps the atomic
parts in `lua/*.lua`; `MemoryQuotaStore` is its in-process twin. Keys are built in keys.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.state.base import QuotaStore
from sidecar.state.memory import MemoryQuotaStore
from sidecar.state.redis_store import RedisQuotaStore

__all__ = ["MemoryQuotaStore", "QuotaStore", "RedisQuotaStore"]

if TYPE_CHECKING:

    def _both_stores_are_quota_stores(
        memory: MemoryQuotaStore, redis: RedisQuotaStore
    ) -> tuple[QuotaStore, QuotaStore]:
        return memory, redis  # mypy checks each against the protocol here
