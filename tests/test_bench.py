"""The benchmark harness on tiny shapes: it runs, reports what it promises, rejects bad input.

Speed itself is never asserted here (RULES: the benchmark, not a test, proves the targets).
"""

import json

import pytest
import torch

from lstmkit import bench
from lstmkit.cli import main


def test_run_reports_each_point():
    points = [bench.Point("LSTM", "train", batch=2, hidden=4, input_size=3, steps=3),
              bench.Point("GRU", "forward", batch=1, hidden=5, input_size=2, steps=2, layers=2,
                          bidirectional=True)]
    results = bench.run(points, repeats=1, warmup=0, rate=100.0)
    assert results["matmul_gflops"] == 100.0 and results["machine"]["cores"] >= 1
    for point, row in zip(points, results["points"], strict=True):
        assert row["family"] == point.family and row["lstmkit_ms"] > 0 and row["torch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["lstmkit_ms"])
        assert row["lstmkit_gflops"] == pytest.approx(point.flops() / 1e6 / row["lstmkit_ms"])
        assert row["target_class"] == "small" and row["target_met"] == (row["speedup"] >= 2)
    table = bench.markdown(results).splitlines()
    assert len(table) == 2 + len(points) and table[2].startswith("| LSTM | train | 2 | 4 |")


def test_flops_and_classes():
    point = bench.Point("LSTM", "forward", batch=2, hidden=3, input_size=5, steps=7)
    assert point.flops() == 2 * 7 * 2 * 12 * (5 + 3)
    assert bench.Point("GRU", "train", batch=2, hidden=3, input_size=5, steps=7).flops() == \
        3 * 2 * 7 * 2 * 9 * (5 + 3)
    assert bench.Point(batch=64, hidden=512).target_class == "medium"
    assert bench.Point(batch=128, hidden=1024).target_class == "large"
    assert bench.Point(batch=128, hidden=64).target_class == "-"


def test_streaming_reports_microseconds():
    result = bench.streaming(hidden=8, input_size=8, steps=5, repeats=1)
    assert result["lstmkit_us_per_step"] > 0 and result["torch_us_per_step"] > 0


def test_point_rejects_bad_values():
    with pytest.raises(ValueError, match="family must be one of"):
        bench.Point("LSTMX")
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        bench.Point(batch=0)


def test_cli_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    code = main(["bench", "--family", "LSTM", "--mode", "forward", "--batch", "1,2",
                 "--hidden", "4", "--steps", "2", "--repeats", "1", "--warmup", "0",
                 "--streaming-steps", "3", "--streaming-hidden", "4", "--json", str(path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "matmul rate" in printed and "streaming batch 1" in printed
    results = json.loads(path.read_text())
    assert [p["batch"] for p in results["points"]] == [1, 2]
    assert results["streaming"]["hidden"] == 4 and results["dtype"] == "float32"
    torch.set_num_threads(threads)                 # the command sets the thread count


def test_cli_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--batch", "0"])
    assert exit_info.value.code == 2
    assert "expected positive integers" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0"]) == 2
