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


def test_random_weight_shapes_and_a_subset_of_methods(tmp_path, monkeypatch):
    """``--shapes`` (the GPU workload's path: HF random init, the engine loads the same weights) and ``--methods``."""
    from kubeinfer_serving.bench import roofline

    small = dict(roofline.LLAMA_3_2_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    monkeypatch.setitem(roofline.SHAPES, "small-test", small)
    report = kubeinfer_bench.main(["--smoke", "--shapes", "small-test", "--methods", "static", "engine",
                                   "--out-dir", str(tmp_path)])
    assert set(report["methods"]) == {"engine", "static"} and report["model"] == "random weights, small-test shapes"
    assert report["mismatch_reference"] == "static"
    assert report["mismatching_requests_vs_sequential"]["engine"] == 0  # same random weights in both
    assert set(report["engine_ratio_per_rep_median"]["4"]) == {"vs_static"}
    assert report["decode_roofline"] == {}  # CUDA only


def test_static_batch_follows_concurrency_and_int8_runs_next_to_unquantized(tmp_path):
    """Issue 19's CPU comparison at CI size: static batching per concurrency, the engine's int8 twin
    (tokens/s, weight bytes, greedy agreement) and the Markdown table."""
    report = kubeinfer_bench.main(["--num-requests", "6", "--prompt-len", "4", "16", "--output-len", "2", "6",
                                   "--concurrency", "2", "4", "--reps", "1", "--static-batch", "concurrency",
                                   "--methods", "sequential", "static", "--compare-quantization", "int8",
                                   "--out-dir", str(tmp_path)])
    assert [r["concurrency"] for r in report["methods"]["static"]] == [2, 4]
    assert [r["concurrency"] for r in report["methods"]["engine_int8"]] == [2, 4]
    for c in ("2", "4"):
        assert set(report["engine_ratio_per_rep_median"][c]) == {"vs_static", "vs_sequential", "engine_int8_vs_engine"}
    assert report["mismatching_requests_vs_sequential"]["engine"] == 0
    assert "engine_int8" not in report["mismatching_requests_vs_sequential"]  # compared by agreement instead
    q = report["quantization_comparison"]
    assert q["weights_bytes"] < q["unquantized_weights_bytes"]
    assert 0.0 <= q["greedy_token_agreement_vs_engine"] <= 1.0
    table = kubeinfer_bench.format_table(report)
    assert "| 4 | engine_int8 |" in table and "| 2 | static |" in table and "greedy token agreement" in table
