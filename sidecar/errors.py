"""The one error family of the sidecar.

Being over a limit is a *decision*, never an exception. Exceptions are for things that went
wrong: a policy that does not validate, a store that cannot be reached, a request that cannot
be parsed. Each error knows the HTTP status it becomes when it reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    status = 500


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One problem in a policy file, located so an editor or CI log can jump to it."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(SidecarError):
    """A policy set that cannot be loaded. Carries every problem found, not just the first."""

    status = 500

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class StateUnavailable(SidecarError):
    """The shared quota store did not answer in time or refused the call."""

    status = 503


class BadRequest(SidecarError):
    """The request cannot be understood (malformed header, body or attribute)."""

    status = 400


class SettingsError(SidecarError):
    """Process settings (flags, QOS_* environment) are invalid. Raised at start only."""

    status = 500
