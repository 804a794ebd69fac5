"""`memplan calibrate`: measured speeds replace the preset's, the file it writes loads back, and bad
requests get clear errors."""

import json

import pytest

from memplan.errors import InvalidInput
from memplan.ir.hardware import hardware_from_dict, load_hardware
from memplan.planner.cli import main
from memplan.runtime.calibrate import calibrate, write_hardware

MiB = 2**20


def test_measured_figures_replace_the_preset(tmp_path):
    hw = load_hardware("cpu")
    new, report = calibrate(hw, sample_bytes=4 * MiB, matmul_n=256, reps=1)
    assert new.name == "cpu-calibrated" and new.flops == report.flops > 0 and new.mem_bw == report.mem_bw > 0
    ssd = new.tier("ssd")
    (speed,) = report.tiers
    assert (speed.name, speed.write_bw, speed.read_bw) == ("ssd", ssd.write_bw, ssd.read_bw)
    assert ssd.compute_share == speed.compute_share and 0.0 <= ssd.compute_share <= 1.0
    assert (speed.preset_write_bw, speed.preset_read_bw) == (hw.tier("ssd").write_bw, hw.tier("ssd").read_bw)
    assert ssd.capacity_bytes == hw.tier("ssd").capacity_bytes and new.tier("device") == hw.tier("device")
    path = tmp_path / "hw.json"
    write_hardware(new, str(path), "test")
    assert load_hardware(path) == new
    assert json.loads(path.read_text())["description"] == "test"
    assert report.to_dict()["tiers"][0]["name"] == "ssd"


def test_only_the_named_tiers():
    new, report = calibrate(load_hardware("cpu"), [], sample_bytes=MiB, matmul_n=64, reps=1)
    assert report.tiers == () and new.tier("ssd") == load_hardware("cpu").tier("ssd")


def test_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(InvalidInput, match="no tier 'host'"):
        calibrate(load_hardware("cpu"), ["host"], sample_bytes=MiB, reps=1)
    with pytest.raises(InvalidInput, match="device tier"):
        calibrate(load_hardware("cpu"), ["device"], sample_bytes=MiB, reps=1)
    gpu = load_hardware("a100-40gb")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="this machine has none"):
            calibrate(gpu, sample_bytes=MiB, reps=1)
    assert main(["calibrate", "--reps", "0", "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "machine.json"
    assert main(["calibrate", "--sample", "2MiB", "--reps", "1", "-o", str(out)]) == 0
    hw = hardware_from_dict(json.loads(out.read_text()))
    assert hw.name == "cpu-calibrated" and "ssd read bytes/s" in capsys.readouterr().out
