"""benchmarks/models.py: the scratch model repository of a QoS run. The siloed copies share
the shared model's devices: with one instance each silo runs at a third of its speed, with
three (QoServe's comparison) each silo is one full-speed device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.models import MODELS, make_model_repo, silo_name

CLASSES = ("interactive", "standard", "batch")


def setting(config: Path, pattern: str) -> str:
    found = re.search(pattern, config.read_text())
    assert found is not None, pattern
    return found.group(1)


@pytest.mark.parametrize(("instances", "silo_speed"), [(1, 2.0 / 3), (3, 2.0)])
def test_silos_split_the_shared_models_devices(
    tmp_path: Path, instances: int, silo_speed: float
) -> None:
    repo = make_model_repo(MODELS["llm"], tmp_path, 2.0, CLASSES, instances=instances)
    shared = repo / "llm" / "config.pbtxt"
    assert setting(shared, r"count: (\d+)") == str(instances)
    assert float(setting(shared, r'key: "speed" value: \{ string_value: "([^"]+)"')) == 2.0
    for klass in CLASSES:
        silo = repo / silo_name("llm", klass) / "config.pbtxt"
        assert setting(silo, r"(?m)^name: \"([^\"]+)\"") == silo_name("llm", klass)
        assert setting(silo, r"count: (\d+)") == "1"
        speed = float(setting(silo, r'key: "speed" value: \{ string_value: "([^"]+)"'))
        assert speed == pytest.approx(silo_speed, rel=1e-5)
