"""The queue depth an arrival reads between two scrapes of Triton (`Deferrer.model_signals`):
Triton's at the last scrape, plus what this replica let go since, less what ended since.

Without the ends, every request let go in a scrape interval counted as queued until the next
scrape, even one that had run and ended meanwhile: at 3x on the benchmark (250 ms scrapes,
about 70 let go a second) arrivals read up to 17 more than Triton held, interactive ones were
held or shed by their lateness limit while the model idled (`benchmarks/README.md`, "Depth
between scrapes")."""

from __future__ import annotations

from sidecar.deferral import Deferrer
from tests.test_service_overload import Backend, policy_with_overload

MODEL = "simgpu"


def depth(deferrer: Deferrer, backend: Backend) -> int:
    return deferrer.model_signals(MODEL, backend.view(), 0.0).queue_depth


def test_depth_counts_what_went_since_the_scrape_less_what_ended_since() -> None:
    backend = Backend(depth=3)
    policy = policy_with_overload()
    deferrer = Deferrer(lambda: policy, backend.view, stale_after_s=1.0)
    assert depth(deferrer, backend) == 3
    deferrer.note_admitted(MODEL)
    deferrer.note_admitted(MODEL)
    assert depth(deferrer, backend) == 5  # let go since: not in Triton's count yet
    deferrer.note_ended(MODEL)
    assert depth(deferrer, backend) == 4  # a batch ended: the queue moved on by one
    for _ in range(5):
        deferrer.note_ended(MODEL)
    assert depth(deferrer, backend) == 0  # more ended than went and were queued: empty
    backend.depth = 2
    deferrer.on_scrape()  # the scrape counts everything so far
    assert depth(deferrer, backend) == 2
    deferrer.note_ended("other")
    assert depth(deferrer, backend) == 2  # another model's end
