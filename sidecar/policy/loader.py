"""Policy YAML files to one validated `Policy` snapshot, or every problem with its file:line.

Rules:
- A path is a file (read whatever its name) or a directory (its *.yaml and *.yml files, sorted,
  not recursive; dot-files are skipped). The files are merged into one policy: each class,
  tenant and model is defined once across all of them, `identity`, `unknown_tenants` and
  `lease_ttl_s` at most once.
- Each file is composed into YAML nodes that keep their lines (`nodes.py`, with merge keys in
  `merge_keys.py`) and walked against the sections the model declares (`document.py`); then
  checks that need every file run on the merged result (`checks.py`).
- Every problem is collected and raised together as one `PolicyError`; a `Policy` is built only
  when there are none, so a half-valid policy never exists. Messages are
  `file:line: dotted.path: what is wrong`.
- `Policy.version` hashes the files' names and bytes (not their directories), so every replica
  that mounts the same files reports the same version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from sidecar.errors import PolicyError, PolicyProblem
from sidecar.policy.checks import Merged
from sidecar.policy.document import Document
from sidecar.policy.model import Policy

POLICY_SUFFIXES = (".yaml", ".yml")
VERSION_HEX_CHARS = 12


def load_policy(paths: Sequence[Path | str]) -> Policy:
    """Load, merge and validate the policy files at `paths` (files or directories).

    Raises PolicyError carrying every problem found, each located at file:line.
    """
    problems: list[PolicyProblem] = []
    files = _discover([Path(p) for p in paths], problems)
    docs: list[Document] = []
    contents: list[tuple[str, bytes]] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            problems.append(PolicyProblem(str(file), 1, f"cannot read: {exc.strerror or exc}"))
            continue
        contents.append((file.name, raw))
        doc = Document(str(file), problems)
        doc.parse(raw)
        docs.append(doc)

    merged = Merged(docs, problems)
    if not paths:
        problems.append(PolicyProblem("<none>", 1, "no policy paths given"))
    elif docs and all(doc.parsed for doc in docs):
        # A file that is not YAML hides what it defines: checking references across files
        # would report everything it was meant to define as missing.
        merged.check()
    if problems:
        order = {str(f): i for i, f in enumerate(files)}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.line))
        raise PolicyError(problems)
    return merged.build(version=policy_version(contents), sources=tuple(str(f) for f in files))


def policy_version(contents: Iterable[tuple[str, bytes]]) -> str:
    """Short content hash of (file name, bytes) pairs, independent of their order."""
    digest = hashlib.sha256()
    for name, raw in sorted(contents):
        encoded = name.encode()
        # Length-prefixed, so no two different sets of files hash the same input.
        for part in (encoded, raw):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()[:VERSION_HEX_CHARS]


def policy_files(paths: Sequence[Path | str]) -> list[Path]:
    """The files `load_policy` would read for `paths`; missing paths are left out."""
    return _discover([Path(p) for p in paths], [])


def _discover(paths: Sequence[Path], problems: list[PolicyProblem]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            try:
                found = sorted(
                    child
                    for child in path.iterdir()
                    # Dot-files are editor swap files and the `..data` links of a Kubernetes
                    # ConfigMap volume, whose real files also appear under their own names.
                    if child.suffix in POLICY_SUFFIXES
                    and not child.name.startswith(".")
                    and child.is_file()
                )
            except OSError as exc:
                problems.append(PolicyProblem(str(path), 1, f"cannot list: {exc.strerror}"))
                continue
            if not found:
                problems.append(
                    PolicyProblem(str(path), 1, "no policy files (*.yaml, *.yml) in this directory")
                )
        elif path.exists():
            found = [path]
        else:
            problems.append(PolicyProblem(str(path), 1, "no such file or directory"))
            continue
        for file in found:
            # The same file named twice (a directory and a file in it) is read once; reading
            # it twice would report every name in it as defined twice.
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files
