import json

import pytest

from memplan.errors import InvalidInput
from memplan.ir.hardware import hardware_from_dict, load_hardware, preset_names


def test_presets_ship_and_load():
    assert {"cpu", "t4-16gb", "a100-40gb", "a100-80gb", "h100-80gb"} <= set(preset_names())
    for name in preset_names():
        hw = load_hardware(name)
        assert hw.tier("device").capacity_bytes > 0
        assert hw.has_tier("ssd")
    assert not load_hardware("cpu").has_tier("host")  # the CPU's RAM is the device; no separate host tier
    assert load_hardware("a100-80gb").tier("device").capacity_bytes == 80 * 2**30


def _desc(**over):
    d = {
        "name": "mine",
        "device_kind": "cuda",
        "flops": 1e14,
        "mem_bw": 1e12,
        "tiers": [
            {"name": "device", "capacity_bytes": 2**30, "read_bw": 1e12, "write_bw": 1e12, "latency_s": 0},
            {
                "name": "cxl",
                "capacity_bytes": 2**34,
                "read_bw": 6e10,
                "write_bw": 6e10,
                "latency_s": 3e-7,
                "numa_node": 2,
            },
        ],
    }
    d.update(over)
    return d


def test_hardware_file(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(_desc()))
    hw = load_hardware(str(path))
    assert hw.tier("cxl").numa_node == 2


@pytest.mark.parametrize(
    "desc, message",
    [
        (_desc(flops=-1), "invalid at flops"),
        (_desc(tiers=[]), "invalid at tiers"),
        (
            _desc(tiers=[{"name": "host", "capacity_bytes": 1, "read_bw": 1, "write_bw": 1, "latency_s": 0}]),
            "needs a tier named 'device'",
        ),
        (
            _desc(
                tiers=[{"name": "device", "capacity_bytes": 1, "read_bw": 1, "write_bw": 1, "latency_s": 0}]
                * 2
            ),
            "unique",
        ),
        (_desc(bogus=1), "Additional properties"),
    ],
)
def test_invalid_hardware(desc, message):
    with pytest.raises(InvalidInput, match=message):
        hardware_from_dict(desc)


def test_unknown_hardware_and_bad_json(tmp_path):
    with pytest.raises(InvalidInput, match="not a preset"):
        load_hardware("no-such-machine")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        load_hardware(str(bad))
    with pytest.raises(InvalidInput, match="has no tier 'host'"):
        load_hardware("cpu").tier("host")
