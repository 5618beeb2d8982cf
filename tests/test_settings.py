from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from sidecar.errors import SettingsError
from sidecar.settings import ListenAddr, Settings, add_arguments, load_settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_bind_localhost_and_use_memory_store() -> None:
    settings = load_settings(parse([]), environ={})
    assert settings == Settings()
    assert settings.admin_host_port == ("127.0.0.1", 9090)
    assert settings.redis_url == ""
    # Envoy-facing listeners: Unix sockets where the shipped Envoy bootstraps look for them.
    assert settings.authz_http_listen == ListenAddr(unix_path="/tmp/qos-sidecar/authz.sock")
    assert settings.grpc_addr == "unix:/tmp/qos-sidecar/grpc.sock"
    assert (settings.auth_token, settings.allow_unauthenticated) == ("", False)


def test_unix_addresses_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"QOS_AUTHZ_HTTP_ADDR": "unix:a.sock", "QOS_GRPC_ADDR": f"unix:{tmp_path}/g.sock"}
    settings = load_settings(parse([]), environ=env)
    assert settings.authz_http_listen == ListenAddr(unix_path=str(tmp_path / "a.sock"))
    assert settings.grpc_addr == f"unix:{tmp_path}/g.sock"  # what grpc's add_insecure_port takes
    assert not settings.grpc_listen.is_network


@pytest.mark.parametrize(
    ("addr", "is_network"),
    [
        ("127.0.0.1:9192", False),
        ("127.0.0.53:9192", False),
        ("[::1]:9192", False),
        ("localhost:9192", False),
        ("0.0.0.0:9192", True),
        (":9192", True),
        ("[::]:9192", True),
        ("10.1.2.3:9192", True),
        ("sidecar.internal:9192", True),  # a name may resolve to anything
    ],
)
def test_network_listener_without_token_refuses_to_start(addr: str, is_network: bool) -> None:
    env = {"QOS_GRPC_ADDR": addr}
    if not is_network:
        assert not load_settings(parse([]), environ=env).grpc_listen.is_network
        return
    with pytest.raises(SettingsError, match=r"^grpc_addr: .* QOS_AUTH_TOKEN is not set"):
        load_settings(parse([]), environ=env)
    # The same address with a token, or with the explicit opt-out, starts.
    assert load_settings(parse(["--auth-token", "t"]), environ=env).auth_token == "t"
    opted_out = load_settings(parse([]), environ={**env, "QOS_ALLOW_UNAUTHENTICATED": "true"})
    assert opted_out.allow_unauthenticated is True


def test_http_listener_is_checked_too() -> None:
    with pytest.raises(SettingsError, match=r"^authz_http_addr: 0\.0\.0\.0:9191 is reachable"):
        load_settings(parse([]), environ={"QOS_AUTHZ_HTTP_ADDR": "0.0.0.0:9191"})


def test_flags_win_over_environment() -> None:
    env = {"QOS_REDIS_URL": "redis://env:6379/0", "QOS_REDIS_TIMEOUT_MS": "80"}
    settings = load_settings(parse(["--redis-url", "redis://flag:6379/0"]), environ=env)
    assert settings.redis_url == "redis://flag:6379/0"
    assert settings.redis_timeout_ms == 80


def test_lists_and_empty_hosts() -> None:
    env = {
        "QOS_POLICY_PATH": "a, b,",
        "QOS_GRPC_ADDR": ":9192",
        "QOS_AUTH_TOKEN": "s3cret",  # a network listener needs one (test_network_listener_...)
        "QOS_TRITON_URLS": "http://t0:8000,http://t1:8000",
    }
    settings = load_settings(parse([]), environ=env)
    assert settings.policy_path == ("a", "b")
    assert settings.grpc_addr == "0.0.0.0:9192"  # grpc needs the host spelled out
    assert settings.triton_endpoints() == [
        ("triton-0", "http://t0:8000", "http://t0:8002/metrics"),
        ("triton-1", "http://t1:8000", "http://t1:8002/metrics"),
    ]


def test_a_policy_path_with_a_comma_that_exists_is_one_path(tmp_path: Path) -> None:
    """A directory named like a class mix (`mix-3,1,1`) once split into three paths that
    did not exist: one that exists as written is taken whole."""
    named = tmp_path / "mix-3,1,1"
    named.mkdir()
    settings = load_settings(parse([]), environ={"QOS_POLICY_PATH": f"{named} "})
    assert settings.policy_path == (str(named),)
    both = f"{tmp_path / 'a'},{tmp_path / 'b'}"  # neither exists as a whole: two paths
    settings = load_settings(parse([]), environ={"QOS_POLICY_PATH": both})
    assert settings.policy_path == (str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QOS_ADMIN_ADDR": "localhost"}, "admin_addr: expected HOST:PORT"),
        # Admin stays TCP: Prometheus and probes speak HTTP over TCP.
        ({"QOS_ADMIN_ADDR": "unix:/tmp/a.sock"}, "admin_addr: expected HOST:PORT"),
        ({"QOS_GRPC_ADDR": "unix:"}, "grpc_addr: expected unix:/path"),
        (
            {"QOS_GRPC_ADDR": "unix:/" + "d" * 120 + "/g.sock"},
            "grpc_addr: socket path .* is longer than 107 bytes",
        ),
        ({"QOS_ALLOW_UNAUTHENTICATED": "maybe"}, "allow_unauthenticated: expected true or false"),
        ({"QOS_REDIS_TIMEOUT_MS": "fast"}, "redis_timeout_ms: expected an integer"),
        ({"QOS_REDIS_TIMEOUT_MS": "0"}, "redis_timeout_ms: must be positive"),
        ({"QOS_REDIS_MODE": "shard"}, "redis_mode: expected one of single, cluster, sentinel"),
        ({"QOS_REDIS_MODE": "cluster"}, "redis_url: cluster mode needs HOST:PORT seeds"),
        (
            {"QOS_REDIS_MODE": "cluster", "QOS_REDIS_URL": "10.0.0.1:7000,10.0.0.2"},
            "redis_url: expected HOST:PORT, got '10.0.0.2'",
        ),
        (
            {"QOS_REDIS_MODE": "sentinel", "QOS_REDIS_URL": "s1:26379"},
            "redis_sentinel_master: sentinel mode needs the primary's name",
        ),
        ({"QOS_QUEUE_ALPHA_MS_PER_UNIT": "-1"}, "queue_alpha_ms_per_unit: must not be negative"),
        ({"QOS_TRITON_NUDGE_MS": "-1"}, "triton_nudge_ms: must not be negative"),
        ({"QOS_TRITON_STALE_MS": "100"}, "triton_stale_ms: must be at least triton_scrape_ms"),
        (
            {"QOS_TRITON_URLS": "http://a:8000", "QOS_TRITON_METRICS_URLS": "x,y"},
            "triton_metrics_urls: one per triton_urls entry",
        ),
        ({"QOS_WORKERS": "0"}, "workers: must be at least 1"),
        (
            {"QOS_WORKERS": "2", "QOS_REDIS_URL": "redis://r:6379"},
            "authz_http_addr: workers > 1 need TCP listeners",
        ),
        (
            {
                "QOS_WORKERS": "2",
                "QOS_AUTHZ_HTTP_ADDR": "127.0.0.1:9001",
                "QOS_GRPC_ADDR": "127.0.0.1:9002",
            },
            "redis_url: workers > 1 need a shared store",
        ),
    ],
)
def test_bad_settings_fail_at_start_with_the_setting_named(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(parse([]), environ=env)


def test_topology_scopes_the_model_counts() -> None:
    # Gateway (the default): one fleet-wide count per model, as before topologies existed.
    assert load_settings(parse([]), environ={}).model_pod is None
    pod = load_settings(parse([]), environ={"QOS_TOPOLOGY": "pod", "QOS_POD_ID": "triton-7"})
    assert pod.model_pod == "triton-7"
    by_host = load_settings(parse(["--topology", "pod"]), environ={})
    assert by_host.model_pod == socket.gethostname()
    with pytest.raises(SettingsError, match="topology: one of gateway, pod, not 'pods'"):
        load_settings(parse([]), environ={"QOS_TOPOLOGY": "pods"})


def test_redis_modes_take_seed_lists() -> None:
    cluster = load_settings(
        parse(["--redis-mode", "cluster"]),
        environ={"QOS_REDIS_URL": "redis://10.0.0.1:7000, 10.0.0.2:7001"},
    )
    assert (cluster.redis_mode, cluster.redis_url) == (
        "cluster",
        "redis://10.0.0.1:7000, 10.0.0.2:7001",
    )
    sentinel = load_settings(
        parse([]),
        environ={
            "QOS_REDIS_MODE": "sentinel",
            "QOS_REDIS_URL": "s1:26379,s2:26379",
            "QOS_REDIS_SENTINEL_MASTER": "qos",
        },
    )
    assert sentinel.redis_sentinel_master == "qos"
    assert load_settings(parse([]), environ={}).redis_mode == "single"


def test_a_worker_reads_back_every_setting_its_supervisor_passes_on() -> None:
    from sidecar.workers import worker_environment, worker_settings

    settings = load_settings(
        parse(["--workers", "3", "--triton-urls", "http://a:8000,http://b:8000"]),
        environ={
            "QOS_AUTHZ_HTTP_ADDR": "127.0.0.1:9001",
            "QOS_GRPC_ADDR": "127.0.0.1:9002",
            "QOS_REDIS_URL": "redis://r:6379",
            "QOS_ALLOW_UNAUTHENTICATED": "true",
        },
    )
    worker = worker_settings(settings, 2, "k" * 64)
    env = {k: v for k, v in worker_environment(worker).items() if k.startswith("QOS_")}
    assert load_settings(parse([]), environ=env) == worker
    # Worker 2: its own admin port, the shared lease key, still knowing it is one of three.
    assert (worker.admin_addr, worker.lease_key) == ("127.0.0.1:9092", "k" * 64)
    assert (worker.workers, worker.worker_index) == (3, 2)


def test_the_grpc_server_is_ours_unless_grpcio_is_asked_for() -> None:
    assert load_settings(parse([]), environ={}).grpc_server == "own"
    chosen = load_settings(parse([]), environ={"QOS_GRPC_SERVER": "grpcio"})
    assert chosen.grpc_server == "grpcio"
    with pytest.raises(SettingsError, match="grpc_server: one of own, grpcio, not 'grpc'"):
        load_settings(parse(["--grpc-server", "grpc"]), environ={})
