"""The ext_proc stream's phases as a table: no gRPC, no event loop.

Each row is a stream Envoy can send, as the steps the sidecar answers with, and the phase it
ends in. Only FORWARDED leaves the lease to the access log; in every other phase the adapter
frees an admit itself when the stream ends.
"""

from __future__ import annotations

import pytest

from sidecar.envoy.ext_proc import TRANSITIONS, Phase, Step, advance

S = Step


@pytest.mark.parametrize(
    ("steps", "ends_in"),
    [
        ((S.COMPLETE,), Phase.FORWARDED),  # headers without a body, admitted
        ((S.REFUSE,), Phase.REFUSED),  # shed on the headers, or malformed
        ((S.ADMIT,), Phase.BODY),  # admitted; the stream ends before the body: release
        ((S.ADMIT, S.COMPLETE), Phase.FORWARDED),  # admitted, whole body rewritten
        ((S.ADMIT, S.CHUNK, S.CHUNK, S.COMPLETE), Phase.FORWARDED),  # body in chunks
        ((S.ADMIT, S.CHUNK), Phase.BODY_CHUNKS),  # cut short mid-upload: release
        ((S.ADMIT, S.REFUSE), Phase.REFUSED),  # request_headers again mid-request
        ((S.ADMIT, S.PASS, S.COMPLETE), Phase.FORWARDED),  # trailers before the body's end
        ((S.WAIT_FOR_BODY,), Phase.BODY_TO_DECIDE),  # a token model waits for its body
        ((S.WAIT_FOR_BODY, S.COMPLETE), Phase.FORWARDED),  # decided on the body: admitted
        ((S.WAIT_FOR_BODY, S.REFUSE), Phase.REFUSED),  # decided on the body: shed
        ((S.WAIT_FOR_BODY, S.CHUNK, S.COMPLETE), Phase.FORWARDED),  # decided on a chunk
        ((S.COMPLETE, S.PASS, S.PASS, S.PASS), Phase.FORWARDED),  # response messages
        ((S.COMPLETE, S.REFUSE), Phase.FORWARDED),  # refused after forwarding: not released
    ],
)
def test_streams_end_in_their_phase(steps: tuple[Step, ...], ends_in: Phase) -> None:
    phase = Phase.HEADERS
    for step in steps:
        phase = advance(phase, step)
    assert phase is ends_in


@pytest.mark.parametrize(
    ("phase", "step"),
    [
        (Phase.HEADERS, S.PASS),  # the first message must be request headers
        (Phase.HEADERS, S.CHUNK),
        (Phase.BODY, S.ADMIT),  # a request is decided once
        (Phase.BODY, S.WAIT_FOR_BODY),
        (Phase.BODY_TO_DECIDE, S.ADMIT),
        (Phase.FORWARDED, S.COMPLETE),  # nothing is forwarded twice
        (Phase.FORWARDED, S.CHUNK),
        *((Phase.REFUSED, step) for step in Step),  # the sidecar ended the stream
    ],
)
def test_steps_a_phase_cannot_take(phase: Phase, step: Step) -> None:
    with pytest.raises(KeyError):
        advance(phase, step)


def test_every_phase_has_a_row_and_only_complete_forwards() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase, row in TRANSITIONS.items():
        for step, after in row.items():
            if after is Phase.FORWARDED and phase is not Phase.FORWARDED:
                assert step is Step.COMPLETE, (phase, step)
        if phase is not Phase.REFUSED:
            # Whatever Envoy sends, the sidecar can answer it: an empty answer or a refusal.
            assert {Step.PASS, Step.REFUSE} <= set(row) or phase is Phase.HEADERS
            assert Step.REFUSE in row
