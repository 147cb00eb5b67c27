"""`crucible doctor`: health judged against the table from injected figures, the report, sysinfo."""

import json

import pytest

from crucible.infra import doctor, storage, sysinfo
from crucible.plan.hardware import find_accelerator


def test_a_device_far_below_its_table_figures_fails():
    h100 = find_accelerator("h100")
    # 300 TFLOP/s is 30% of the 989.4 dense bf16 peak; 10 GB/s is 16% of Gen5 x16's 63.0.
    checks = doctor.device_checks("cuda:0", h100, 300.0, h2d_gbs=10.0, d2d_gbs=3000.0)
    assert [c.status for c in checks] == ["fail", "fail", "ok"]
    assert checks[0].reference == 989.4 and "30% of table (< 50%)" in checks[0].detail
    assert checks[2].reference == 3350 and checks[2].detail == "90% of table"


def test_a_healthy_device_passes_and_threshold_is_respected():
    h100 = find_accelerator("h100")
    assert [c.status for c in doctor.device_checks("cuda:0", h100, 745.0)] == ["ok"]
    assert doctor.device_checks("cuda:0", h100, 745.0, threshold=0.8)[0].status == "fail"


def test_no_table_entry_reports_without_judging():
    (check,) = doctor.device_checks("cuda:0", None, 12.0)
    assert check.status == "info" and check.reference is None


def test_report_without_timings_passes_and_serialises(tmp_path):
    report = doctor.run_doctor(tmp_path, measure=False)
    assert report.ok and report.versions["torch"]
    trip = [c for c in report.checks if c.name.startswith("checkpoint round trip")]
    assert trip[0].status == "ok" and "identical bit for bit" in trip[0].detail
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is True and data["cpu"]["logical_cores"] >= 1
    md = doctor.report_markdown(report)
    for section in ("## Versions", "## CPU", "## NUMA nodes", "## Devices", "## Checks"):
        assert section in md


def test_cpu_measurements_are_reported_not_judged(tmp_path):
    report = doctor.run_doctor(None, measure=True, min_time_s=0.01)
    names = {c.name: c for c in report.checks}
    if "cpu matmul fp32" in names:  # this machine has no CUDA device
        assert names["cpu matmul fp32"].status == "info" and names["cpu matmul fp32"].measured > 0
        assert report.ok


def test_failed_round_trip_fails_the_report(tmp_path, monkeypatch):
    bad = storage.RoundTrip(1000, 0.1, 0.1, 4, ["model.0.weight"])
    monkeypatch.setattr(storage, "checkpoint_roundtrip", lambda root: bad)
    report = doctor.run_doctor(tmp_path, measure=False)
    assert not report.ok
    assert "1 of 4 tensors differ: model.0.weight" in report.checks[0].detail


def test_bad_storage_and_bad_gpu_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        doctor.run_doctor(tmp_path / "absent", measure=False)
    with pytest.raises(ValueError, match="unknown GPU 'h900'; known: .*MI300X"):
        doctor.run_doctor(tmp_path, gpu="h900", measure=False)


def test_numa_layout_from_sysfs(tmp_path):
    for node, cpus, kb in ((0, "0-3,8-11", 16 * 2**20), (1, "4-7", 8 * 2**20)):
        d = tmp_path / f"node{node}"
        d.mkdir()
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(
            f"Node {node} MemTotal:       {kb} kB\nNode {node} MemFree: 1 kB\n"
        )
    nodes = sysinfo.numa_nodes(tmp_path)
    assert [(n["node"], n["ncpus"], n["mem_gib"]) for n in nodes] == [(0, 8, 16.0), (1, 4, 8.0)]
    assert sysinfo.numa_nodes(tmp_path / "none") == []


def test_env_vars_keep_the_ones_that_matter():
    env = {
        "NCCL_DEBUG": "INFO",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "OMP_NUM_THREADS": "4",
        "HOME": "/root",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "PATH": "/bin",
    }
    assert list(sysinfo.env_vars(env)) == [
        "CUDA_VISIBLE_DEVICES",
        "NCCL_DEBUG",
        "OMP_NUM_THREADS",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    ]
