"""A small synchronous client for the end-to-end tests: infer through Envoy, ask the admin."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFER_PATH = "/v2/models/simgpu/infer"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def infer(
    base_url: str,
    *,
    api_key: str | None = None,
    klass: str | None = None,
    delay_ms: float = 5.0,
    timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
) -> Reply:
    body = {
        "inputs": [{"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [delay_ms]}]
    }
    sent = dict(headers or {})
    if api_key is not None:
        sent["x-api-key"] = api_key
    if klass is not None:
        sent["x-qos-class"] = klass
    return post(base_url + INFER_PATH, body, sent, timeout_s)


def post(url: str, body: Any, headers: dict[str, str], timeout_s: float = 30.0) -> Reply:
    """POST `body` as JSON; any status comes back as a Reply."""
    sent = {"content-type": "application/json", **headers}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def explain(admin_url: str, api_key: str | None = None, klass: str | None = None) -> Any:
    headers = {}
    if api_key is not None:
        headers["x-api-key"] = api_key
    if klass is not None:
        headers["x-qos-class"] = klass
    payload = json.dumps({"path": INFER_PATH, "headers": headers}).encode()
    request = urllib.request.Request(
        admin_url + "/v1/explain", data=payload, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def metric_value(admin_url: str, name: str, **labels: str) -> float:
    """The sum of samples of `name` whose labels include `labels` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll until `predicate` holds; return when it did (monotonic). No fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.02)
    return time.monotonic()


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` in a daemon thread; its result lands in the returned list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def key_digest(api_key: str) -> str:
    """What a policy's `api_key_sha256` lists for `api_key`."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def write_policy_file(directory: Path, text: str) -> Path:
    """`text` as the one policy file of `directory`; the directory (what QOS_POLICY_PATH
    names)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(text)
    return directory
