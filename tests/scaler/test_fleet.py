"""The fleet file: the example loads, defaults merge, bad entries name the problem."""

from __future__ import annotations

import pytest

from scaler.fleet import fleet_from_dict, load_fleet


def test_the_example_fleet_loads_with_its_shapes_and_policies():
    fleet = load_fleet()
    by = {p.name: p for p in fleet.pools}
    assert set(by) == {"general", "memory", "gpu"}
    assert by["gpu"].pool.shape.gpus == 1 and by["gpu"].pool.shape.boot_s == 420
    assert by["general"].pool.policy.mode == "scale" and by["general"].pool.policy.warm_max_size == 10
    assert by["general"].availability_zones == ("us-east-1a",)  # from [defaults]
    assert by["memory"].launch_template_name == "warmcast-memory"


def test_yaml_fleet_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("pools:\n  - {name: cpu, vcpu: 2, memory_gb: 4, max_size: 3, mode: scale_out_only}\n")
    (pool,) = load_fleet(path).policy_pools()
    assert pool.name == "cpu" and pool.policy.mode == "scale_out_only" and pool.policy.max_size == 3


@pytest.mark.parametrize(
    "data, words",
    [
        ({"pools": [{"name": "a", "vcpu": 2, "memory_gb": 4, "colour": "red"}]}, r"unknown key\(s\) colour"),
        ({"pools": [{"vcpu": 2, "memory_gb": 4}]}, "'name' is required"),
        ({"pools": [{"name": "a", "vcpu": 2, "memory_gb": 4, "min_size": 5, "max_size": 2}]}, "min 5 > max 2"),
        ({"pools": [{"name": "a/b", "vcpu": 2, "memory_gb": 4}]}, "not a well-formed identifier"),
        ({"pools": [{"name": "a", "vcpu": 2, "memory_gb": 4}, {"name": "a", "vcpu": 2, "memory_gb": 4}]}, "repeated: a"),
        ({"pools": []}, "no \\[\\[pools\\]\\]"),
        ({"pool": []}, "unknown top-level key"),
    ],
)
def test_bad_fleet_entries_are_rejected_with_the_reason(data, words):
    with pytest.raises(ValueError, match=words):
        fleet_from_dict(data)
