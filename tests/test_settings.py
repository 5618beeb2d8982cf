from __future__ import annotations

import argparse

import pytest

from sidecar.errors import SettingsError
from sidecar.settings import Settings, add_arguments, load_settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_bind_localhost_and_use_memory_store() -> None:
    settings = load_settings(parse([]), environ={})
    assert settings == Settings()
    assert settings.admin_host_port == ("127.0.0.1", 9090)
    assert settings.redis_url == ""


def test_flags_win_over_environment() -> None:
    env = {"QOS_REDIS_URL": "redis://env:6379/0", "QOS_REDIS_TIMEOUT_MS": "80"}
    settings = load_settings(parse(["--redis-url", "redis://flag:6379/0"]), environ=env)
    assert settings.redis_url == "redis://flag:6379/0"
    assert settings.redis_timeout_ms == 80


def test_lists_and_empty_hosts() -> None:
    env = {
        "QOS_POLICY_PATH": "a, b,",
        "QOS_GRPC_ADDR": ":9192",
        "QOS_TRITON_URLS": "http://t0:8000,http://t1:8000",
    }
    settings = load_settings(parse([]), environ=env)
    assert settings.policy_path == ("a", "b")
    assert settings.grpc_addr == "0.0.0.0:9192"  # grpc needs the host spelled out
    assert settings.triton_endpoints() == [
        ("triton-0", "http://t0:8000", "http://t0:8002/metrics"),
        ("triton-1", "http://t1:8000", "http://t1:8002/metrics"),
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QOS_ADMIN_ADDR": "localhost"}, "admin_addr: expected HOST:PORT"),
        ({"QOS_REDIS_TIMEOUT_MS": "fast"}, "redis_timeout_ms: expected an integer"),
        ({"QOS_REDIS_TIMEOUT_MS": "0"}, "redis_timeout_ms: must be positive"),
        ({"QOS_QUEUE_ALPHA_MS_PER_UNIT": "-1"}, "queue_alpha_ms_per_unit: must not be negative"),
        ({"QOS_TRITON_STALE_MS": "100"}, "triton_stale_ms: must be at least triton_scrape_ms"),
        (
            {"QOS_TRITON_URLS": "http://a:8000", "QOS_TRITON_METRICS_URLS": "x,y"},
            "triton_metrics_urls: one per triton_urls entry",
        ),
    ],
)
def test_bad_settings_fail_at_start_with_the_setting_named(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(parse([]), environ=env)
