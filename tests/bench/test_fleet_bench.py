"""``python -m bench.fleet_bench --smoke`` (the CI size) runs every workload against a real fleet and writes its JSON."""

from __future__ import annotations

import json

from bench import fleet_bench


def test_smoke_run_measures_every_workload(tmp_path) -> None:
    fleet_bench.main(["--smoke", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "fleet_bench.json").read_text())
    assert set(report["fleet"]) == {"random", "ideal", "router"}
    for workload in ("fleet", "prefix", "unique"):
        for routing, row in report[workload].items():
            assert row["failed"] == 0 and row["output_tok_s"] > 0, (workload, routing, row)
    assert report["fleet"]["ideal"]["model_loads"] == report["config"]["models"]  # one load per model and pod
    assert all(0 <= row["prefix_hit_rate"] <= 1 for row in report["prefix"].values())
    assert report["prefix"]["router"]["prefix_hit_tokens"] > 0  # a group's later requests reuse its prefix
    peaks = report["unique"]["router"]["max_inflight_per_endpoint"]
    assert peaks and max(peaks.values()) >= 1
    assert report["overhead"]["tok_s_ratio_router_vs_direct"] > 0
    assert set(report["targets"]) >= {"fleet_loads_le_1.2x_models", "overhead_added_ttft_lt_3ms"}
