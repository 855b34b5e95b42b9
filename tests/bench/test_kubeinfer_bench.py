"""``kubeinfer_bench --smoke`` (the CI size) completes and writes well-formed JSON and a PNG."""

from __future__ import annotations

import json

from kubeinfer_serving.bench import kubeinfer_bench


def test_smoke_run_writes_json_and_plot(tmp_path):
    kubeinfer_bench.main(["--smoke", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "kubeinfer_bench.json").read_text())
    assert set(report["methods"]) == {"engine", "transformers_cb", "static", "sequential"}
    for rows in report["methods"].values():
        for row in rows:
            assert row["output_tok_s"] > 0 and row["ttft_p99_s"] >= row["ttft_median_s"] > 0
    assert report["mismatching_requests_vs_sequential"]["engine"] == 0
    assert (tmp_path / "kubeinfer_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
