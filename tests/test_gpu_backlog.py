"""The GPU backlog (benchmarks/gpu/backlog.py) decides, on the lent machine, which runs a 15-minute
lease starts; collect.py turns what came back into the committed report. A mistake in either costs
device time nobody can get back, so both are checked here on CPU: every backlog item names a model
and a result key that perf.py really writes; an item counts as done exactly when its committed result
is there (on a GPU: a perf run with exit code 0 and a measurement; a complete correctness file, pass
or fail; a full-size conversion; never a CPU dry run); items that do not fit the time left are skipped without starting anything; the runner
really starts the first pending item (conversion speed, toy size) and keeps its result; collect
merges per-architecture correctness files and names the GPU; SIGTERM to the runner leaves no process of
the sessions it started behind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import backlog  # noqa: E402
import collect  # noqa: E402
import perf  # noqa: E402


def test_every_item_names_a_benchmarked_model_and_the_keys_perf_writes():
    items = backlog.backlog()
    assert items[0].name == "convert:llama3-8b" and {i.step for i in items} == {"v1", "v2"}
    assert len({i.name for i in items}) == len(items), "an item is listed twice"
    for item in items:
        if item.kind in ("convert",):
            assert item.arg in perf.shapes.SHAPES
        elif item.kind == "correctness":
            assert item.arg in ("llama", "qwen3")
        else:
            shape, model, lens = item.perf_parts()
            assert model in perf.model_configs(shape), item.name
            # perf.py keys its runs "{shape}/{model}/{len}/{mode}" for each (shape, model, len) of its plan
            assert [f"{s}/{m}/{n}/{item.kind}" for s, m, n in perf.parse_plan(f"{shape}:{model}@{','.join(map(str, lens))}")] \
                == item.perf_keys()
    # the targets at 16K come before everything else on the GPU
    v2 = [i.name for i in items if i.step == "v2"]
    assert v2[:5] == ["correctness:llama"] + [f"throughput:llama3-8b:{m}@16384" for m in ("gqa", "care576", "mixed", "mla576")]


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_done_means_a_good_committed_result(tmp_path):
    I = backlog.Item
    gpu = {"device_name": "NVIDIA H200"}
    runs = [{"key": "llama3-8b/gqa/16384/throughput", "rc": 0, "output_tok_s": 500.0, "wall_s": 180.0,
             "shape": "llama3-8b", "input_len": 16384, **gpu},
            {"key": "llama3-8b/care576/16384/throughput", "rc": 1, "output_tok_s": None, "wall_s": 40.0,
             "shape": "llama3-8b", "input_len": 16384, **gpu},                     # crashed: still pending
            {"key": "llama3-8b/mixed/16384/throughput", "rc": 0, "output_tok_s": 9.0, "wall_s": 20.0,
             "shape": "llama3-8b", "input_len": 16384, "device_name": "cpu", "len_divisor": 16},  # a dry run
            {"key": "llama3-8b/gqa/1024/serve", "rc": 0, "output_throughput": 3000.0, "wall_s": 30.0,
             "server_start_s": 70.0, "shape": "llama3-8b", "input_len": 1024, **gpu}]
    _write(tmp_path / "perf_throughput.json", {"runs": runs[:3]})
    _write(tmp_path / "perf_serve.json", {"runs": runs[3:]})
    _write(tmp_path / "correctness_llama.json", {"complete": True, "failed": [], "models": {}, "total_s": 150,
                                                 "device": "cuda", **gpu})
    _write(tmp_path / "correctness_qwen3.json", {"complete": True, "failed": ["qwen3-mixed"], "models": {},
                                                 "device": "cuda", **gpu})
    _write(tmp_path / "convert_speed_llama3-8b_gpu.json", {"shape": "llama3-8b", "device_name": "NVIDIA H200",
           "calibration_tokens": 256 * 2048, "convert_total_s": 100.0, "build_random_model_s": 30.0})
    _write(tmp_path / "convert_speed_qwen3-4b_gpu.json", {"shape": "qwen3-4b", "device_name": "NVIDIA H200",
           "calibration_tokens": 16 * 512, "convert_total_s": 9.0})                 # a dry-run size: not the issue's
    r = backlog.Results([tmp_path])
    assert r.done(I("throughput", "llama3-8b:gqa@16384"))
    assert not r.done(I("throughput", "llama3-8b:care576@16384"))
    assert not r.done(I("throughput", "llama3-8b:mixed@16384"))                  # only a dry run of it
    assert not r.done(I("throughput", "llama3-8b:mla576@16384"))                 # never ran
    assert r.done(I("correctness", "llama")) and r.done(I("correctness", "qwen3"))   # a FAIL is a result too
    assert r.ran(I("correctness", "llama")) and not r.ran(I("correctness", "qwen3"))
    assert r.done(I("convert", "llama3-8b")) and not r.done(I("convert", "qwen3-4b"))
    serve = I("serve", "llama3-8b:gqa@1024,8192,16384")
    assert not r.done(serve) and r.pending_lens(serve) == [8192, 16384]
    # estimates: the slowest good run of the same kind/shape/length, else the defaults (4B scaled)
    assert r.estimate_s(I("throughput", "llama3-8b:mixed@16384")) == 180.0
    assert r.estimate_s(I("throughput", "llama3-8b:mixed@8192")) == backlog.DEFAULT_S["throughput"][8192]
    assert r.estimate_s(I("throughput", "qwen3-4b:gqa@1024")) == pytest.approx(
        backlog.DEFAULT_S["throughput"][1024] * backlog.SMALL_SHAPE_FACTOR["qwen3-4b"])
    assert r.estimate_s(serve) == 70.0 + sum(backlog.DEFAULT_S["serve"][n] for n in (8192, 16384))
    assert r.estimate_s(I("correctness", "qwen3")) == 150
    assert r.estimate_s(I("convert", "llama3-8b")) == 100.0 + 30.0 + 20
    # the perf command runs only the pending lengths of an item; a done item (a --redo) runs all of them
    args = argparse.Namespace(tokenizer="tok", work=tmp_path, out=tmp_path, perf_args="", device="cuda")
    cmd = backlog.item_command(serve, args, r)
    assert cmd[cmd.index("--plan") + 1] == "llama3-8b:gqa@8192,16384"
    cmd = backlog.item_command(I("throughput", "llama3-8b:gqa@16384"), args, r)
    assert cmd[cmd.index("--plan") + 1] == "llama3-8b:gqa@16384" and cmd[cmd.index("--mode") + 1] == "throughput"
    assert r.estimate_s(I("throughput", "llama3-8b:gqa@16384")) == 180.0


def test_items_that_do_not_fit_are_skipped_without_starting(tmp_path, capsys):
    rc = backlog.main(["run", "--step", "v2", "--hard-stop-s", "30", "--out", str(tmp_path / "out"),
                       "--work", str(tmp_path / "work"), "--ignore-committed"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "start " not in text
    pending_v2 = [i for i in backlog.backlog() if i.step == "v2"]
    assert sum(line.startswith("skipped  ") for line in text.splitlines()) == len(pending_v2)
    assert not list((tmp_path / "work").glob("*.log"))


@pytest.mark.slow
def test_the_runner_starts_the_first_pending_item_and_keeps_its_result(tmp_path):
    """v1's first item (8B-shaped conversion speed, 1 layer, toy calibration, no refit) really runs through
    convert_speed.py; its JSON lands in $OUT and in the work folder (the warm machine's next call)."""
    out, work = tmp_path / "out", tmp_path / "work"
    rc = backlog.main(["run", "--step", "v1", "--hard-stop-s", "600", "--out", str(out), "--work", str(work),
                       "--device", "cpu",
                       "--speed-args", "--layers 1 --calib-samples 4 --calib-seqlen 64 --no-o-proj-refit",
                       "--estimate-factor", "0", "--max-items", "1", "--ignore-committed"])
    assert rc == 0
    res = json.loads((out / "convert_speed_llama3-8b_gpu.json").read_text())
    assert res["shape"] == "llama3-8b" and res["layers"] == 1 and res["calibration_tokens"] == 4 * 64
    assert set(res["seconds"]) >= {"calibrate", "factorize", "write"}
    assert (work / "results" / "convert_speed_llama3-8b_gpu.json").is_file()
    # a toy conversion on the CPU is not the measurement: the item stays pending
    assert not backlog.Results([out]).done(backlog.Item("convert", "llama3-8b"))


def test_collect_merges_correctness_per_architecture_and_names_the_gpu(tmp_path):
    src = tmp_path / "call"
    model = {"prompt_logprob_mean_diff": 0.01, "prompt_logprob_max_diff": 0.2, "generated_logprob_max_diff": 0.1,
             "greedy_exact": "8/8", "worst_gap": 0.0, "backends": [], "layer_widths": [576] * 4, "pass": True}
    _write(src / "correctness_llama.json", {"dtype": "bfloat16", "device": "cuda", "device_name": "NVIDIA H200",
                                            "models": {"llama-orig": dict(model), "llama-w576": dict(model)}})
    _write(src / "perf_throughput.json", {"runs": [
        {"key": f"llama3-8b/{m}/16384/throughput", "shape": "llama3-8b", "model": m, "input_len": 16384,
         "output_len": 512, "kv_values_per_token": kv, "rc": 0, "output_tok_s": tok, "device_name": "NVIDIA H200"}
        for m, kv, tok in (("gqa", 65536, 500.0), ("care576", 18432, 700.0), ("mla576", 18432, 720.0))]})
    into = tmp_path / "results"
    collect.main(["--from", str(src), "--into", str(into)])
    second = tmp_path / "call2"
    _write(second / "correctness_qwen3.json", {"dtype": "bfloat16", "device": "cuda", "device_name": "NVIDIA H200",
                                               "models": {"qwen3-w576": dict(model)}})
    collect.main(["--from", str(second), "--into", str(into)])
    report = (into / "REPORT.md").read_text()
    assert report.startswith("# GPU results (NVIDIA H200;")
    for name in ("llama-orig", "llama-w576", "qwen3-w576"):
        assert f"| {name} |" in report
    assert "care576 / stock MLA 576 = 0.972 (within 5 %)" in report        # 700 / 720
    assert "best converted width care576 = 1.40x GQA (target >= 1.3x: met)" in report

    # a later session lent an H100 measures the converted model again: its run neither replaces the H200's nor is
    # compared with the H200's GQA run (no baseline on the H100 yet: no target judged there)
    third = tmp_path / "call3"
    _write(third / "perf_throughput.json", {"runs": [
        {"key": "llama3-8b/care576/16384/throughput", "shape": "llama3-8b", "model": "care576", "input_len": 16384,
         "output_len": 512, "kv_values_per_token": 18432, "rc": 0, "output_tok_s": 650.0,
         "device_name": "NVIDIA H100"}]})
    collect.main(["--from", str(third), "--into", str(into)])
    runs = json.loads((into / "perf_throughput.json").read_text())["runs"]
    assert sorted((r["model"], r["device_name"]) for r in runs) == [
        ("care576", "NVIDIA H100"), ("care576", "NVIDIA H200"), ("gqa", "NVIDIA H200"), ("mla576", "NVIDIA H200")]
    report = (into / "REPORT.md").read_text()
    assert report.startswith("# GPU results (NVIDIA H100, NVIDIA H200;")
    assert "llama3-8b 16384 in on NVIDIA H200: care576 / stock MLA 576 = 0.972 (within 5 %)" in report
    assert "llama3-8b 16384 in on NVIDIA H200: best converted width care576 = 1.40x GQA" in report
    assert "on NVIDIA H100:" not in report   # (650 / 500 = 1.30x would have been claimed against the H200's GQA)


LINGERING_CHILD = """
import os, sys, time
if os.fork() == 0:
    open(sys.argv[1], "w").write(str(os.getpgid(0)))
    time.sleep(1.5)   # (an engine core still freeing the GPU after the command has exited)
    os._exit(0)
time.sleep(0.5)
"""


def test_a_run_returns_once_its_whole_group_has_ended(tmp_path):
    """The next run must find the GPU free: run_logged returns only after the command's children have ended too."""
    from tests.vllm_server import running_in_group

    marker = tmp_path / "pgid"
    assert perf.run_logged([sys.executable, "-c", LINGERING_CHILD, str(marker)], tmp_path / "run.log", 60) == 0
    group = int(marker.read_text())
    assert not running_in_group(group), running_in_group(group)


RUNNER = """
import sys
sys.path.insert(0, {gpu!r})
import perf
from pathlib import Path
sys.exit(perf.stopping_cleanly(lambda argv=None: perf.run_logged(sys.argv[2:], Path(sys.argv[1]), 600), "runner")())
"""


def test_sigterm_to_a_runner_stops_the_groups_it_started_down_to_the_last(tmp_path):
    """The device machine keeps a process of a session of its own running after its command has ended, on the
    GPU, into the next call (the device README). backlog.py runs perf.py, and perf.py runs vLLM, each in a session
    of its own (run_logged). SIGTERM to the outer runner alone, as a command stopped at its limit gets it, now
    reaches the innermost process: each runner stops its group before it exits (143)."""
    import os
    import signal
    import subprocess
    import time

    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(gpu=str(ROOT / "benchmarks" / "gpu")))
    pid_file = tmp_path / "innermost.pid"
    innermost = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    cmd = [sys.executable, str(runner), str(tmp_path / "outer.log"),
           sys.executable, str(runner), str(tmp_path / "inner.log"), sys.executable, "-c", innermost]
    outer = subprocess.Popen(cmd, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text():
            assert outer.poll() is None and time.monotonic() < deadline, (tmp_path / "outer.log").read_text()
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        assert os.getsid(pid) != os.getsid(outer.pid)      # (the signal cannot reach it as a group member)
        outer.send_signal(signal.SIGTERM)
        assert outer.wait(timeout=60) == 143
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        alive = Path(f"/proc/{pid}").exists()
        if alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, "the innermost process outlived the runners"
    finally:
        outer.kill()


def test_a_run_past_its_timeout_stops_the_sessions_a_runner_inside_started(tmp_path):
    """A run killed at its time limit (run_logged's own timeout, no signal to anyone) whose command is itself a
    runner (backlog.py runs correctness.py, which starts its vLLM worker in a session of its own): the worker ended
    with it. Before, only the runner's group was killed and the worker went on, on the GPU, into the next call."""
    import os
    import signal
    import time

    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(gpu=str(ROOT / "benchmarks" / "gpu")))
    pid_file = tmp_path / "innermost.pid"
    innermost = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    t0 = time.monotonic()
    rc = perf.run_logged([sys.executable, str(runner), str(tmp_path / "inner.log"), sys.executable, "-c", innermost],
                         tmp_path / "outer.log", 15)
    assert rc == backlog.KILLED_RC and time.monotonic() - t0 < 60
    assert pid_file.is_file(), "the innermost process never started: the test proves nothing"
    pid = int(pid_file.read_text())
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the innermost process outlived the run that timed out"


def test_an_item_stopped_at_its_limit_is_estimated_longer_than_it_ran(tmp_path):
    """The backlog's estimates learn from runs stopped at their limit: an item killed after 360 s (the item's whole
    run, or one of perf.py's runs) needs more than that, so a later session does not start it again into the same
    wall when less time is left. Estimates came only from runs that finished, and a killed item kept its default."""
    I = backlog.Item
    item = I("throughput", "llama3-8b:mixed@16384")
    fresh = backlog.Results([tmp_path])
    default = fresh.estimate_s(item)
    assert default < 360
    out = tmp_path / "call"
    out.mkdir()
    backlog.record_attempt(out, item, 360.0, backlog.KILLED_RC, 362.0, "cpu")   # a CPU dry run records nothing
    assert not (out / backlog.ATTEMPTS).exists()
    _write(out / backlog.ATTEMPTS, {"attempts": [
        {"item": item.name, "wall_s": 360.0, "rc": backlog.KILLED_RC, "limit_s": 362.0,
         "device_name": "NVIDIA H100", "date": "2026-12-08 10:00:00"},
        {"item": "correctness:llama", "wall_s": 400.0, "rc": 1, "limit_s": 500.0,     # failed, not killed
         "device_name": "NVIDIA H100", "date": "2026-12-08 10:07:00"}]})
    r = backlog.Results([tmp_path, out])
    assert r.estimate_s(item) == 360.0 + 90.0
    assert r.estimate_s(I("correctness", "llama")) == backlog.DEFAULT_S["correctness"]
    # one of perf.py's own runs stopped at its limit inside an item counts the same
    _write(tmp_path / "perf_throughput.json", {"runs": [
        {"key": "llama3-8b/care576/16384/throughput", "rc": backlog.KILLED_RC, "output_tok_s": None, "wall_s": 300.0,
         "shape": "llama3-8b", "input_len": 16384, "device_name": "NVIDIA H100"}]})
    assert backlog.Results([tmp_path]).estimate_s(I("throughput", "llama3-8b:gqa@16384")) == 300.0 + 75.0
    # collect.py keeps every attempt brought back, across sessions
    into = tmp_path / "results"
    collect.main(["--from", str(out), "--into", str(into)])
    later = tmp_path / "call2"
    _write(later / backlog.ATTEMPTS, {"attempts": [
        {"item": item.name, "wall_s": 420.0, "rc": backlog.KILLED_RC, "limit_s": 422.0,
         "device_name": "NVIDIA H200", "date": "2026-12-09 10:00:00"}]})
    collect.main(["--from", str(later), "--into", str(into)])
    kept = json.loads((into / backlog.ATTEMPTS).read_text())["attempts"]
    assert sorted(a["wall_s"] for a in kept) == [360.0, 400.0, 420.0]
    assert backlog.Results([into]).estimate_s(item) == 420.0 + 105.0


def test_collect_reports_a_gqa_run_at_16k_without_a_converted_one(tmp_path):
    """A session may bring back the GQA original's 16K run alone (it is the first throughput item): the report has
    its row and no verdict at 16K yet. collect.py stopped on max() of nothing, and every later call stopped too."""
    src = tmp_path / "call"
    _write(src / "perf_throughput.json", {"runs": [
        {"key": "llama3-8b/gqa/16384/throughput", "shape": "llama3-8b", "model": "gqa", "input_len": 16384,
         "output_len": 512, "kv_values_per_token": 65536, "rc": 0, "output_tok_s": 500.0,
         "device_name": "NVIDIA H100"}]})
    into = tmp_path / "results"
    assert collect.main(["--from", str(src), "--into", str(into)]) == 0
    report = (into / "REPORT.md").read_text()
    assert "| gqa |" in report and "best converted width" not in report


def test_collect_reports_a_model_whose_worker_failed_by_its_error(tmp_path):
    """correctness.py records a model whose vLLM worker failed (its log's tail) and goes on with the others, where
    the first failure ended the run and its reason stayed in the logs tarball: the report names it and the error."""
    src = tmp_path / "call"
    ok = {"prompt_logprob_mean_diff": 0.01, "prompt_logprob_max_diff": 0.2, "generated_logprob_max_diff": 0.1,
          "greedy_exact": "8/8", "worst_gap": 0.0, "backends": [], "layer_widths": [576] * 4, "pass": True}
    _write(src / "correctness_llama.json", {"dtype": "bfloat16", "device": "cuda", "device_name": "NVIDIA H100",
                                            "complete": True, "failed": ["llama-mixed"], "models": {
        "llama-orig": dict(ok), "llama-mixed": {"pass": False, "error": "vLLM worker failed (rc 1):\n...\n"
                                                "ValueError: incompatible dimensions 1024 and 512"},
        "llama-rope96": dict(ok)}})
    into = tmp_path / "results"
    assert collect.main(["--from", str(src), "--into", str(into)]) == 0
    report = (into / "REPORT.md").read_text()
    assert "| llama-mixed | - |" in report and "FAIL (worker error)" in report and "| llama-rope96 |" in report
    assert "- llama-mixed: `ValueError: incompatible dimensions 1024 and 512`" in report
    assert "correctness llama-mixed: FAIL" in report
