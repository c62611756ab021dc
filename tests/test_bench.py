"""The benchmark harness on tiny shapes: it runs, reports what it promises, rejects bad input.

Speed itself is never asserted here (RULES: the benchmark, not a test, proves the targets).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import native_setting
from lstmkit import bench
from lstmkit.cli import main
from lstmkit.kernels import StepLayout, native


def test_run_reports_each_point():
    points = [bench.Point("LSTM", "train", batch=2, hidden=4, input_size=3, steps=3),
              bench.Point("LSTM", "forward", batch=64, hidden=128, input_size=3, steps=2),
              bench.Point("GRU", "forward", batch=1, hidden=5, input_size=2, steps=2, layers=2,
                          bidirectional=True)]
    results = bench.run(points, repeats=1, warmup=0, rate=100.0, min_seconds=0)
    assert results["matmul_gflops"] == results["matmul_gflops_start"] == 100.0
    assert results["machine"]["cores"] >= 1
    for point, row in zip(points, results["points"], strict=True):
        assert row["family"] == point.family and row["lstmkit_ms"] > 0 and row["torch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["lstmkit_ms"])
        assert row["lstmkit_gflops"] == pytest.approx(point.flops() / 1e6 / row["lstmkit_ms"])
        assert row["target_class"] == point.target_class
        assert row["target_met"] == (row["speedup"] >= bench.TARGET_RATIO[point.target_class])
        assert row["speedup_bound"] == pytest.approx(100.0 / row["torch_gflops"])
        assert row["torch_matmul_fraction"] == pytest.approx(row["torch_gflops"] / 100.0)
        assert row["target_status"] in ("met", "missed", "out of reach", "beyond lib")
        # The products bound is measured where the library runs the steps (the generic driver)
        # only: not where the fused driver or the LSTM's own row parts (with oneDNN) run.
        layout = StepLayout.padded(point.steps, point.batch)
        gates = bench.GATES[point.family] * point.hidden
        w_hh = torch.empty(gates, point.hidden)
        own = native._driver(layout, w_hh) == 0 or point.family == "LSTM" and bool(
            native._own_row_parts(layout, torch.empty(gates, point.input_size), w_hh, None))
        assert (row["products_ms"] is None) == own
        if not own:
            assert row["products_bound"] == pytest.approx(row["torch_ms"] / row["products_ms"])
    table = bench.markdown(results).splitlines()
    assert len(table) == 2 + len(points) and table[2].startswith("| LSTM | train | 2 | 4 |")
    assert "bound (100% of matmul rate)" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_isolated_points_run_in_a_fresh_process_with_the_same_threads():
    point = bench.Point("GRU", "train", batch=80, hidden=4, input_size=3, steps=2)   # generic
    results = bench.run([point], repeats=1, warmup=0, rate=100.0, isolate=True, min_seconds=0)
    row = results["points"][0]
    assert row["lstmkit_ms"] > 0 and row["torch_ms"] > 0 and row["products_ms"] > 0
    request = {"point": bench.asdict(point), "dtype": "float64", "device": "cpu", "repeats": 1,
               "warmup": 0, "min_seconds": 0, "threads": 1}
    done = subprocess.run([sys.executable, "-m", "lstmkit.bench", json.dumps(request)],
                          capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.splitlines()[-1])
    assert set(measured) == {"lstmkit_s", "torch_s", "calls", "products_s"}
    assert measured["calls"] == 1
    assert "RuntimeWarning" not in done.stderr


def test_rounds_report_medians_and_the_range_of_speedups(monkeypatch):
    points = [bench.Point("LSTM", "forward", batch=2, hidden=4, input_size=3, steps=3),
              bench.Point("GRU", "train", batch=32, hidden=128, input_size=3, steps=2)]
    # Each measurement's seconds from a script, in the order run() asks for them: the whole
    # list of points once per round.
    script = iter([(2e-3, 5e-3, 4e-3), (1e-3, 4e-3, None),      # round 1: LSTM, GRU
                   (4e-3, 6e-3, 2e-3), (1e-3, 2e-3, None),      # round 2
                   (3e-3, 3e-3, 3e-3), (1e-3, 3e-3, None)])     # round 3
    asked = []

    def scripted(point, dtype, device, repeats, warmup, min_seconds=0):
        asked.append(point.family)
        ours, theirs, products = next(script)
        return {"lstmkit_s": ours, "torch_s": theirs, "calls": 2, "products_s": products}

    monkeypatch.setattr(bench, "_measure", scripted)
    progress = []
    results = bench.run(points, repeats=1, warmup=0, rate=100.0, min_seconds=0, rounds=3,
                        progress=progress.append)
    assert asked == ["LSTM", "GRU"] * 3
    assert [(row["family"], row["round"]) for row in progress] == [
        ("LSTM", 1), ("GRU", 1), ("LSTM", 2), ("GRU", 2), ("LSTM", 3), ("GRU", 3)]
    assert progress[2]["speedup"] == pytest.approx(1.5)         # each round's own row
    lstm, gru = results["points"]
    # LSTM speedups 2.5, 1.5, 1.0: the median of the rounds' ratios, not of the times' ratio.
    assert lstm["speedup"] == pytest.approx(1.5) and lstm["speedup_range"] == pytest.approx(
        [1.0, 2.5])
    assert lstm["lstmkit_ms"] == pytest.approx(3.0) and lstm["torch_ms"] == pytest.approx(5.0)
    assert lstm["products_ms"] == pytest.approx(3.0) and lstm["calls"] == 6
    assert lstm["lstmkit_gflops"] == pytest.approx(points[0].flops() / 1e6 / 3.0)
    assert lstm["products_bound"] == pytest.approx(5.0 / 3.0)
    assert [r["speedup"] for r in lstm["rounds"]] == pytest.approx([2.5, 1.5, 1.0])
    assert gru["speedup"] == pytest.approx(3.0) and gru["products_ms"] is None
    assert gru["target_class"] == "medium" and gru["target_met"] is True
    assert "(1.00-2.50x over 3 rounds)" in bench.format_row(lstm)
    assert "1.50x (1.00-2.50x, 3 rounds)" in bench.markdown(results)
    assert "round" not in lstm and "rounds" not in progress[0]
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="rounds must be a positive integer"):
            bench.run(points, rate=100.0, rounds=bad)
    script = iter([(1e-3, 2e-3, None)] * 4)                  # any integer type counts
    assert len(bench.run(points, rate=100.0, rounds=np.int64(2))["points"][0]["rounds"]) == 2


def test_short_points_get_more_calls_than_repeats(monkeypatch):
    point = bench.Point("LSTM", "forward", batch=1, hidden=3, input_size=2, steps=2)
    timing = bench.time_point(point, repeats=2, warmup=0, min_seconds=0)
    assert timing["calls"] == 2 and timing["lstmkit_s"] > 0 and timing["torch_s"] > 0
    # Every call timed as 1 ms (the machine's speed must not decide the count): 0.05 s of
    # calls of both sides take 25 of each.
    timed = []

    def one_millisecond(fn, device, repeats):
        fn()
        timed.append(fn)
        return 1e-3

    monkeypatch.setattr(bench, "_median_time", one_millisecond)
    assert bench.time_point(point, repeats=2, warmup=0, min_seconds=0.05)["calls"] == 25
    assert len(timed) == 50


def _row(target_class, speedup, torch_gflops, lstmkit_gflops, rate, products=None):
    row = {"target_class": target_class, "speedup": speedup, "torch_gflops": torch_gflops,
           "lstmkit_gflops": lstmkit_gflops, "products_gflops": products}
    bench._judge(row, rate)
    return row


def test_speedup_bound_is_torch_time_over_matmul_time():
    # LSTM forward, batch 8, hidden 256, input 64, length 100: 0.524 GFLOP of products.
    point = bench.Point("LSTM", "forward", batch=8, hidden=256, input_size=64, steps=100)
    gflop = point.flops() / 1e9
    torch_s, rate = 2.29e-3, 430.0
    bound = bench.speedup_bound(gflop / torch_s, rate)
    assert bound == pytest.approx(torch_s / (gflop / rate))
    assert bound == pytest.approx(1.878, abs=1e-3)   # torch.nn already at 53% of the rate


def test_target_status_separates_missed_from_out_of_reach():
    rate = 400.0
    # Small class (2x): torch.nn at 50% of the rate leaves exactly 2x; at 60%, only 1.67x.
    assert _row("small", 2.1, 200.0, 420.0, rate)["target_status"] == "met"
    assert _row("small", 1.5, 100.0, 150.0, rate)["target_status"] == "missed"   # bound 4x
    out = _row("small", 0.9, 240.0, 216.0, rate)
    assert out["speedup_bound"] == pytest.approx(400 / 240)
    assert out["target_met"] is False and out["target_status"] == "out of reach"
    # Medium (1.3x): bound 400/300 = 1.33x still allows it.
    assert _row("medium", 1.0, 300.0, 300.0, rate)["target_status"] == "missed"
    assert _row("medium", 1.0, 320.0, 320.0, rate)["target_status"] == "out of reach"
    # Large: the speedup alone is not enough, 85% of the rate is needed too.
    large = _row("large", 1.1, 250.0, 275.0, rate)
    assert large["lstmkit_matmul_fraction"] == pytest.approx(275 / 400)
    assert large["target_met"] is False and large["target_status"] == "missed"
    assert _row("large", 1.2, 290.0, 348.0, rate)["target_status"] == "met"
    # "beyond lib": reachable at 100% of the rate, but not with the products at the library's speed.
    medium = _row("medium", 1.0, 300.0, 300.0, rate, products=360.0)
    assert medium["products_bound"] == pytest.approx(1.2)
    assert medium["target_status"] == "beyond lib"
    assert _row("medium", 1.0, 300.0, 300.0, rate, products=420.0)["target_status"] == "missed"
    # Large: MKL's products alone at 82% of the rate cannot make 85%, whatever the speedup.
    large = _row("large", 1.1, 250.0, 275.0, rate, products=328.0)
    assert large["products_matmul_fraction"] == pytest.approx(0.82)
    assert large["target_status"] == "beyond lib"
    assert _row("large", 1.1, 250.0, 275.0, rate, products=360.0)["target_status"] == "missed"
    # Outside the classes: no verdict, but the bound is still reported.
    other = _row("-", 0.5, 100.0, 50.0, rate)
    assert other["target_status"] is None and other["speedup_bound"] == pytest.approx(4.0)


def test_printed_and_markdown_rows_show_the_bound():
    row = {**bench.asdict(bench.Point("LSTM", "forward", batch=8, hidden=256)),
           "target_class": "small", "lstmkit_ms": 2.65, "torch_ms": 2.29, "speedup": 2.29 / 2.65,
           "lstmkit_gflops": 197.8, "torch_gflops": 228.9}
    bench._judge(row, 430.0)
    line = bench.format_row(row)
    assert "1.88x" in line and "out of reach" in line and "53%" in line
    table = bench.markdown({"points": [row]}).splitlines()
    assert table[2].endswith("| 0.86x | 1.88x | - | - | small | 2.0x out of reach |")
    assert len(bench.HEADER) == len(line)
    # With the products timed alone: LSTM forward 32 / 256, MKL's products 5.7 ms, torch.nn 6.9.
    row = {**bench.asdict(bench.Point("LSTM", "forward", batch=32, hidden=256)),
           "target_class": "medium", "lstmkit_ms": 7.4, "torch_ms": 6.9, "speedup": 6.9 / 7.4,
           "lstmkit_gflops": 283.0, "torch_gflops": 303.9, "products_gflops": 367.9}
    bench._judge(row, 430.0)
    line = bench.format_row(row)
    assert "1.21x" in line and "86%" in line and "beyond lib" in line
    assert len(bench.HEADER) == len(line)
    table = bench.markdown({"points": [row]}).splitlines()
    assert table[2].endswith("| 1.41x | 1.21x | 86% | medium | 1.3x beyond lib |")


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_products_seconds_times_the_products_alone(monkeypatch, library):
    if library == "onednn" and not native.module().onednn_works():
        pytest.skip("oneDNN's float32 matmul does not run on this CPU (it needs AVX-512)")
    monkeypatch.setattr(native, "_onednn_products", lambda: library == "onednn")
    # Batches above the fused driver's limit, so the library runs the steps (with oneDNN the
    # LSTM's own row parts run instead: nothing to time).
    forward = bench.Point("GRU", "forward", batch=80, hidden=5, input_size=4, steps=6, layers=2,
                          bidirectional=True)
    train = bench.Point("LSTM", "train", batch=80, hidden=5, input_size=4, steps=6)
    one_layer = bench.Point("GRU", "forward", batch=80, hidden=5, input_size=4, steps=6)
    if library == "onednn":
        assert bench.products_seconds(train, repeats=1) is None
        train = bench.Point("LSTM", "train", batch=80, hidden=5, input_size=11, steps=6)
    with native_setting("use_onednn", library == "onednn"):
        for point in (forward, train, one_layer):
            assert bench.products_seconds(point, repeats=1) > 0
        assert bench.products_seconds(train, dtype=torch.float64, repeats=1) > 0
        # float16 and bfloat16 run in float32, and so do their products (the native timing
        # primitives, step_products and products, take float32 and float64 only).
        assert bench.products_seconds(train, dtype=torch.float16, repeats=1) > 0
    # Where lstmkit's own step kernel runs (batch 1), the library's speed bounds nothing.
    assert bench.products_seconds(bench.Point(batch=1, hidden=5, steps=3), repeats=1) is None
    monkeypatch.setattr(native, "available", lambda: False)
    assert bench.products_seconds(train, repeats=1) is None


def test_flops_and_classes():
    point = bench.Point("LSTM", "forward", batch=2, hidden=3, input_size=5, steps=7)
    assert point.flops() == 2 * 7 * 2 * 12 * (5 + 3)
    assert bench.Point("GRU", "train", batch=2, hidden=3, input_size=5, steps=7).flops() == \
        3 * 2 * 7 * 2 * 9 * (5 + 3)
    assert bench.Point(batch=64, hidden=512).target_class == "medium"
    assert bench.Point(batch=128, hidden=1024).target_class == "large"
    assert bench.Point(batch=128, hidden=64).target_class == "-"


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
def test_streaming_reports_microseconds(family):
    result = bench.streaming(hidden=8, input_size=8, steps=5, repeats=1, family=family)
    assert result["lstmkit_us_per_step"] > 0 and result["torch_us_per_step"] > 0
    assert result["family"] == family
    assert result["speedup"] == result["torch_us_per_step"] / result["lstmkit_us_per_step"]
    # The 2x target is the LSTM's.
    assert result["target_met"] == (result["speedup"] >= 2.0 if family == "LSTM" else None)


def test_streaming_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="family must be one of .*, got 'LSTMX'"):
        bench.streaming(hidden=8, input_size=8, steps=5, repeats=1, family="LSTMX")


def test_point_rejects_bad_values():
    with pytest.raises(ValueError, match="family must be one of"):
        bench.Point("LSTMX")
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        bench.Point(batch=0)


def run_cli(tmp_path, capsys, *options):
    """`lstmkit bench` on tiny shapes (hidden 4, length 2, one call each) in this process:
    (exit code, what it printed, the JSON file). The command sets the thread count: put back."""
    threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    try:
        code = main(["bench", *options, "--hidden", "4", "--steps", "2", "--repeats", "1",
                     "--warmup", "0", "--json", str(path), "--same-process",
                     "--min-seconds", "0"])
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().out, json.loads(path.read_text())


def test_cli_writes_json(tmp_path, capsys):
    code, printed, results = run_cli(tmp_path, capsys, "--family", "LSTM", "--mode", "forward",
                                     "--batch", "1,2", "--streaming-steps", "3",
                                     "--streaming-hidden", "4")
    assert code == 0
    assert "matmul rate" in printed and "lstmkit.LSTMCell" in printed
    assert "GRUCell" not in printed                        # the families asked for only
    assert [p["batch"] for p in results["points"]] == [1, 2]
    assert list(results["streaming"]) == ["LSTM"]
    assert results["streaming"]["LSTM"]["hidden"] == 4 and results["dtype"] == "float32"


def test_cli_rounds_print_each_round_then_the_medians(tmp_path, capsys):
    code, printed, results = run_cli(tmp_path, capsys, "--family", "GRU", "--mode", "forward",
                                     "--batch", "1,3", "--rounds", "2", "--streaming-steps", "0")
    assert code == 0
    lines = printed.splitlines()
    assert lines.index("round 1 of 2") < lines.index("round 2 of 2")
    assert sum(line.startswith("GRU ") for line in lines) == 6      # 2 points x (2 rounds + 1)
    assert sum("over 2 rounds)" in line for line in lines) == 2
    assert [len(p["rounds"]) for p in results["points"]] == [2, 2]
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds must be positive, got 0" in capsys.readouterr().err


def test_the_matmul_rate_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """matmul_rate times oneDNN's matmul as well as torch.mm (MKL, slow off Intel CPUs) on the
    CPU in float32, and keeps the faster: a stand-in for oneDNN that multiplies nothing must
    raise the rate by far."""
    calls = []

    def nothing(a, b):
        calls.append(tuple(a.shape))
        return a
    monkeypatch.setattr(bench, "_onednn_mm", lambda: nothing)
    with_stand_in = bench.matmul_rate(size=256, repeats=3)
    assert calls and calls[0] == (16, 16)        # first checked on a small product
    monkeypatch.setattr(bench, "_onednn_mm", lambda: None)
    alone = bench.matmul_rate(size=256, repeats=3)
    assert with_stand_in > 10 * alone
    calls.clear()
    bench.matmul_rate(dtype=torch.float64, size=64, repeats=1)     # float64: torch.mm alone
    assert not calls


def test_the_matmul_rate_is_measured_in_the_dtype_the_products_run_in():
    assert bench.matmul_dtype(torch.float16, "cpu") == torch.float32
    assert bench.matmul_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert bench.matmul_dtype(torch.float64, "cpu") == torch.float64
    assert bench.matmul_dtype(torch.float16, "cuda") == torch.float16     # tensor cores


def test_cli_low_precision_reports_the_rate_it_measured(tmp_path, capsys):
    code, printed, results = run_cli(tmp_path, capsys, "--dtype", "bfloat16", "--family", "GRU",
                                     "--mode", "forward", "--batch", "80",
                                     "--streaming-steps", "0")
    assert code == 0
    assert "in float32, the dtype lstmkit computes bfloat16 in on the cpu" in printed
    assert results["dtype"] == "bfloat16" and results["matmul_dtype"] == "float32"
    assert results["points"][0]["products_ms"] > 0


def test_cli_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--batch", "0"])
    assert exit_info.value.code == 2
    assert "expected positive integers" in capsys.readouterr().err
    assert main(["bench", "--repeats", "0"]) == 2
    assert main(["bench", "--min-seconds", "-1"]) == 2
    assert "--min-seconds must be >= 0, got -1" in capsys.readouterr().err
    for device in ("tpu", "meta"):
        assert main(["bench", "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device '{device}': expected cpu or cuda[:N]" in err
        assert len(err.strip().splitlines()) == 1


def test_cli_refuses_an_unwritable_json_path_before_running(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(a))
    assert main(["bench", "--json", str(tmp_path)]) == 2
    assert f"output file {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    (tmp_path / "notes").write_text("mine")
    assert main(["bench", "--json", str(tmp_path / "notes" / "bench.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and len(err.strip().splitlines()) == 1
    assert ran == [] and (tmp_path / "notes").read_text() == "mine"
