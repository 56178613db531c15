"""End to end: `care-bench ORIGINAL CONVERTED OUT` (care_vllm/loadtest) as a user runs it: it starts
stock `vllm serve` on a tiny GQA original and the plugin's on its conversion, one after the other,
drives both with `vllm bench serve` on a shared-prefix workload (`--prefix-len`), and writes the
report.

The conversion drops nothing (KV parity, RoPE on every key dim: equal to the original's logits,
tests/test_converter_exact.py), so the original is the reference for the report's quality half:
greedy agreement must be exact and held-out perplexity equal. Also checked: every request completed
at every level, both servers found the shared prefix in their prefix cache (for the converted model
that needs care_vllm/cpu_scheduling.py) but each level only within itself (the cache is emptied
between levels, which send the same prompts), the KV-cache tokens the report gives are the budget over
the bytes a token takes, and the summary, plots and raw `vllm bench serve` results are written. And
SIGTERM, while a server starts or a level runs, stops the server before care-bench exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_run import frozen
from tests.served_reference import KV_BYTES, MAX_LEN, varied_original
from tests.vllm_server import ROOT

pytest.importorskip("vllm")
pytest.importorskip("openai")

pytestmark = pytest.mark.slow

PREFIX, OWN, PROMPTS = 256, 16, 8
HEAD_DIM = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory, calib_file):
    """(a tiny GQA original, its exact conversion)."""
    from converter.pipeline import convert

    root = tmp_path_factory.mktemp("care_bench")
    src = varied_original(root / "orig", "llama", head_dim=HEAD_DIM)   # stock vLLM on CPU: head_dim >= 32
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], kv_ratio=1.0, rope_dim=2 * HEAD_DIM, calib_samples=8,
            calib_seqlen=64, ranks="uniform")
    return src, out


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def bench_command(src, out, report, *extra) -> list[str]:
    return [sys.executable, "-m", "care_vllm.loadtest.cli", str(src), str(out), str(report),
            "--num-prompts", str(PROMPTS), "--prefix-len", str(PREFIX), "--input-len", str(OWN), "--output-len", "8",
            "--kv-cache-memory-bytes", str(KV_BYTES), "--max-model-len", str(MAX_LEN), "--serve-args=--enforce-eager",
            "--agreement-tokens", "8", *map(str, extra)]


@pytest.fixture(scope="module")
def bench(pair, calib_file):
    src, out = pair
    report = src.parent / "report"
    cmd = bench_command(src, out, report, "--concurrency", "1", "2", "--ppl-text", calib_file, "--ppl-tokens", "1024",
                        "--ppl-seqlen", "64")
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return report, json.loads((report / "report.json").read_text()), r.stdout


def test_every_request_completed_and_both_hit_the_prefix_cache(bench):
    _, rep, summary = bench
    print(summary)
    assert rep["workload"]["prefix_len"] == PREFIX
    for role in ("original", "converted"):
        levels = rep["models"][role]["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 2]
        for level in levels:
            c, res = level["concurrency"], level["result"]
            assert res["completed"] == PROMPTS and res["failed"] == 0, (role, c, res)
            assert "prefix_repetition" in level["command"]
            assert level["prefix_cache_reset"] is True, (role, c)
            pc = level["prefix_cache"]
            # all prompts share one prefix: all but the first c (sent together) can read it from the cache,
            assert pc["hit_tokens"] >= (PROMPTS - c) * (PREFIX // 2), (role, c, pc)
            # and the first one cannot (with the previous level's cache kept, all PROMPTS would find it)
            assert pc["hit_tokens"] <= (PROMPTS - 1) * PREFIX, (role, c, pc)
            assert pc["queried_tokens"] <= PROMPTS * (PREFIX + OWN + 8), (role, c, pc)


def test_quality_of_an_exact_conversion_is_the_originals(bench):
    _, rep, _ = bench
    q = rep["quality"]
    assert q["greedy_agreement"]["prompts"] == 16
    assert q["greedy_agreement"]["exact_match_rate"] == 1.0, q["greedy_agreement"]
    po, pc = q["perplexity"]["original"], q["perplexity"]["converted"]
    assert po["tokens"] == pc["tokens"] > 0
    assert abs(pc["ppl"] / po["ppl"] - 1) < 1e-3, (po, pc)


def test_report_files_and_kv_tokens(bench):
    report, rep, _ = bench
    o, c = rep["models"]["original"], rep["models"]["converted"]
    assert c["cache_values_per_token"] == o["cache_values_per_token"]     # KV parity
    fp32_bytes = 4 * c["cache_values_per_token"]
    for m in (o, c):   # the KV budget over the bytes a token takes, down to whole blocks (16 or 128)
        assert KV_BYTES // fp32_bytes - 128 < m["kv_cache_tokens"] <= KV_BYTES // fp32_bytes, m
        assert m["levels"][0]["metrics_timeline"], "no /metrics samples during the level"
    summary = (report / "summary.md").read_text()
    assert "prefix_repetition dataset, 256 shared (one of 1 prefixes) + 16 in / 8 out tokens" in summary and "prefix-cache hits" in summary
    assert "prefix cache emptied before each level" in summary
    import torch
    import vllm

    # what served them, against the modules' own versions (the installed wheel's adds a local tag: 0.32.0+cpu)
    versions = rep["machine"]["versions"]
    assert versions["vllm"].startswith(vllm.__version__) and versions["torch"] == torch.__version__, versions
    assert f"- versions: vllm {versions['vllm']}, care-vllm {versions['care-vllm']}, torch {torch.__version__}" in summary
    for name in ("throughput.png", "latency.png", "kv_usage.png", "raw/original_c2.json", "raw/converted_c2.json"):
        assert (report / name).is_file(), name


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process (None: gone, or a zombie), from /proc/PID/stat alone: unlike
    its cmdline, whose read waits for the process's memory-map lock, stat cannot stall behind a process that is
    busy mapping memory."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":   # a zombie holds nothing, and whether one is reaped yet is up to its new parent (init)
        return None
    return int(fields[1]), int(fields[2])


def _server_group(bench_pid: int) -> int | None:
    """The process group of the `vllm serve` care-bench started: its child that leads a group of its own (it starts
    the server in a new session; `vllm bench serve` stays in care-bench's group)."""
    for d in Path("/proc").iterdir():
        st = _stat(d.name) if d.name.isdigit() else None
        if st and st[0] == bench_pid and st[1] == int(d.name):
            return st[1]
    return None


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every process this user can see, zombies aside."""
    found = {}
    for d in Path("/proc").iterdir():
        st = _stat(d.name) if d.name.isdigit() else None
        if st:
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(d.name)] = (st[1], cmdline)
    return found


@pytest.mark.parametrize("when", ["starting", "benchmarking"])
def test_sigterm_stops_the_server_it_started(pair, tmp_path, when):
    """`timeout`, a scheduler's time limit or `docker stop` end care-bench with SIGTERM, which by default kills
    Python without unwinding: the `vllm serve` it had started (in a session of its own, to be stopped as a process
    group: engine core and workers) ran on, holding its port and the accelerator. Now care-bench stops it and
    exits 143 with one line, whether the server was still loading the model or a level was running `vllm bench
    serve` (converter/interrupts.py, care_vllm/loadtest/server.py).

    care-bench is frozen while the test looks at where it is (tests/cli_run.py frozen), and SIGTERM is sent before
    it thaws: the signal lands in the phase the test saw, however long the test took to look (it once missed the
    original's whole level)."""
    src, out = pair
    report = tmp_path / "report"
    err = tmp_path / "stderr.txt"
    level_line = "[care-bench] original: concurrency 1"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(bench_command(src, out, report, "--concurrency", "1"), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline, group, seen = time.monotonic() + 600, None, ""
        while group is None:
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not {when} after 600 s: {err.read_text()[-3000:]}"
            with frozen(proc):
                seen = err.read_text()
                if when == "benchmarking":
                    ready = level_line in seen
                else:   # loading the model: its front end waits for the engine core (VllmServer.stop)
                    server_log = report / "raw" / "original_server.log"
                    ready = server_log.exists() and "Starting to load model" in server_log.read_text(errors="replace")
                group = _server_group(proc.pid) if ready else None
                if group is not None:
                    proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert "converted" not in seen, f"SIGTERM came after the original's level: {seen}"   # (by construction)
    left = {}
    for _ in range(100):   # (stop() waits for `vllm serve`; its engine core may take a moment longer)
        left = {pid: cmd for pid, (g, cmd) in _processes().items() if g == group or str(tmp_path) in cmd}
        if not left:
            break
        time.sleep(0.1)
    for pid in left:   # (so that a failure here does not leave them to the tests that follow)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 143, err.read_text()[-3000:]
    assert err.read_text().strip().splitlines()[-1] == "care-bench: terminated (SIGTERM)"
    assert not left, left


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_an_originals_cache_size_follows_its_config_class(tmp_path, model_type):
    """The report's cache values per token of a GQA original whose config.json leaves head_dim (and, for one,
    the KV-head count) to its config class: transformers' values (Qwen3's default head_dim is 128, not
    hidden / heads; Mistral's absent num_key_value_heads is 8, whatever the query-head count)."""
    from transformers import AutoConfig

    from care_vllm.loadtest.cli import _cache_values

    raw = {"model_type": model_type, "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
           "vocab_size": 1000, **({} if model_type == "mistral" else {"num_key_value_heads": 2})}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = AutoConfig.from_pretrained(tmp_path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert _cache_values(tmp_path) == 3 * 2 * cfg.num_key_value_heads * head_dim
    assert (model_type != "qwen3") or head_dim == 128   # (the case hidden / heads got wrong)


BAD_ARGUMENTS = {   # case: (arguments after ORIGINAL CONVERTED OUT, the error's words)
    "not_a_checkpoint": (None, "is not a checkpoint folder (no config.json)"),
    "converted_not_care_mla": (None, "not a care_mla checkpoint (model_type 'llama'); convert it with care-convert "
                                     "first"),
    "negative_prefix": (["--prefix-len", "-1"], "--prefix-len must be >= 0"),
    "more_prefixes_than_prompts": (["--prefix-len", "64", "--num-prefixes", "9", "--num-prompts", "8"],
                                   "1 <= --num-prefixes <= --num-prompts"),
    "num_prompts_0": (["--num-prompts", "0"], "--num-prompts must be >= 1 (got 0)"),
    "missing_dataset": (["--dataset-path", "{tmp}/prompts.jsonl"], "prompts.jsonl: not a file"),
    "dataset_without_prompts": (["--dataset-path", "{tmp}/bad.jsonl"],
                                'bad.jsonl:1: each line needs a string "prompt" field'),
    "range_ratio_of_1": (["--random-range-ratio", "1"], "expected 0 <= R < 1"),
    "range_ratio_with_prefix": (["--random-range-ratio", "0.5", "--prefix-len", "64"], "for random prompts only"),
    # without these checks each got as far as `vllm bench serve` or the quality pass, after both servers started
    "concurrency_0": (["--concurrency", "1", "0"], "--concurrency levels and --agreement-tokens must be >= 1"),
    "concurrency_twice": (["--concurrency", "2", "2"], "--concurrency 2 2: a level is given twice"),
    "output_len_0": (["--output-len", "0"], "--input-len and --output-len must be >= 1"),
    "request_rate_word": (["--request-rate", "fast"], "--request-rate must be a positive number"),
    "ppl_seqlen_1": (["--ppl-seqlen", "1"], "--ppl-seqlen >= 2"),
    "missing_ppl_text": (["--ppl-text", "{tmp}/held-out.txt"], "--ppl-text: held-out text file not found"),
    "bad_ppl_jsonl": (["--ppl-text", "{tmp}/bad.jsonl"], 'a .jsonl line needs a string "text" field'),
    "unreachable_url": (["--original-url", "http://127.0.0.1:{closed}"], "no OpenAI-compatible server answers"),
    "out_is_a_file": ([], "exists and is not a folder"),
    "out_holds_other_files": ([], "is a folder that holds other files and no care-bench report"),
    # and these started a server that refused them, or ran with a workload vLLM cut short
    "max_model_len_short": (["--input-len", "256", "--output-len", "64", "--max-model-len", "300"],
                            "--max-model-len 300 is shorter than the workload's longest request, 320 tokens"),
    "max_model_len_short_of_the_spread": (["--input-len", "100", "--output-len", "20", "--random-range-ratio", "0.5",
                                           "--max-model-len", "170"], "longest request, 180 tokens"),
    "negative_temperature": (["--temperature", "-1"], "--temperature must be >= 0 (got -1.0)"),
    "unknown_dtype": (["--dtype", "foo"], "--dtype 'foo': choose from auto, half"),
    "kv_bytes_word": (["--kv-cache-memory-bytes", "abc"], "--kv-cache-memory-bytes 'abc': expected a positive"),
    "kv_bytes_0": (["--kv-cache-memory-bytes", "0"], "--kv-cache-memory-bytes '0': expected a positive"),
    "unbalanced_quote": (['--serve-args=--enforce-eager "x'], "--serve-args '--enforce-eager \"x': No closing quotation"),
    "level_timeout_0": (["--level-timeout", "0"], "--level-timeout must be a positive number of seconds"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(case, pair, tmp_path, capsys, calib_file):
    """Refused before a server starts, with one line naming the problem. (A bad --ppl-text was read after both
    servers had run, with a traceback and no report; an unreachable --original-url and an OUT that is a file gave
    tracebacks; a bad --max-model-len, --dtype, --temperature, --kv-cache-memory-bytes or dataset line started a
    server that refused it (exit 1, a traceback tail); an unbalanced quote in --serve-args was a traceback after
    OUT was made.)"""
    from care_vllm.loadtest.cli import main

    src, conv = pair
    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\n')
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))   # (bound, never listening: a connection is refused)
    extra, needle = BAD_ARGUMENTS[case]
    models = {"not_a_checkpoint": [src, calib_file.parent], "converted_not_care_mla": [src, src]}.get(case, [src, conv])
    out = tmp_path / "report"
    if case == "out_is_a_file":
        out.write_text("kept")
    elif case == "out_holds_other_files":
        out.mkdir()
        (out / "notes.txt").write_text("kept")
    args = [a.format(tmp=tmp_path, closed=closed.getsockname()[1]) for a in extra or []]
    try:
        assert main([*map(str, models), str(out), *args]) == 2
    finally:
        closed.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("care-bench: error: ") and needle in err, err
    if case == "out_is_a_file":
        assert out.read_text() == "kept"
    elif case == "out_holds_other_files":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


@pytest.mark.parametrize("value", ["1G", "3T", "1024", "1K", "500m", "25.6k", "2.5g", "0"])
def test_kv_cache_bytes_are_read_as_vllm_reads_them(value):
    """care-bench checks --kv-cache-memory-bytes without importing vLLM: the same number as vLLM's own parser."""
    from vllm.utils.argparse_utils import human_readable_int

    from care_vllm.loadtest.cli import byte_count

    assert byte_count(value) == human_readable_int(value)


def test_a_rerun_into_an_earlier_reports_folder_replaces_all_of_its_files(tmp_path):
    """A rerun left the earlier run's summary, plots and raw results of levels it did not run beside its own
    report: they are removed first (only what care-bench writes; another file in the folder is kept)."""
    from care_vllm.loadtest.cli import OUTPUTS, prepare_out

    out = tmp_path / "report"
    (out / "raw").mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"command": ["care-bench", "a", "b", str(out)]}))
    for name in ("summary.md", "throughput.png", "latency.png", "kv_usage.png", "raw/original_c16.json"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("kept")
    prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert set(OUTPUTS) == {"report.json", "summary.md", "throughput.png", "latency.png", "kv_usage.png", "raw"}


def test_a_level_past_its_timeout_is_an_error_of_the_run_not_a_traceback(tmp_path):
    """`vllm bench serve` past --level-timeout is killed and ends the run as care-bench's other failures do
    (a RuntimeError: one error line, report.json of what finished), not with subprocess.TimeoutExpired's traceback
    and no report. (The real `vllm bench serve` is still importing vLLM when 0.5 s are up; the endpoint only
    answers the /metrics reads around the level, with no samples.)"""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from care_vllm.loadtest.workload import Workload, run_level

    class EmptyMetrics(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EmptyMetrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match=r"vllm bench serve at concurrency 1 ran past 0.5 s \(--level-timeout\)"):
            run_level(f"http://127.0.0.1:{httpd.server_address[1]}", "m", str(tmp_path), Workload(1, 8, 4), 1,
                      tmp_path / "raw", "original", timeout=0.5)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_that_does_not_start_is_one_error_line_and_a_report_of_what_finished(pair, tmp_path):
    """(It was a ServerError traceback; had the converted model's server failed, the original's finished results
    were lost with it.)"""
    orig, conv = pair
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "care_vllm.loadtest.cli", str(orig), str(conv), str(out),
                        "--serve-args=--no-such-flag"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"care-bench: error: vllm serve {orig} exited with 2:" in r.stderr
    assert "unrecognized arguments: --no-such-flag" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"care-bench: what finished is in {out / 'report.json'}"
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == {} and "exited with 2" in report["error"]


def test_the_workload_line_puts_the_length_spread_after_the_lengths():
    from care_vllm.loadtest.workload import Workload

    wl = Workload(8, 128, 32, "inf", 0, temperature=0.0, range_ratio=0.5)
    assert wl.describe() == "random dataset, 128 in / 32 out tokens (each drawn from +-50 %), temperature 0"


def test_a_mistyped_folder_is_refused_before_torch_is_imported(tmp_path, calib_file):
    """Only a GGUF original needs the (torch-importing) GGUF reader: a mistyped folder is answered at once, by a
    process that never imported torch."""
    from tests.cli_run import run_main_alone

    out = tmp_path / "report"
    proc, torch_imported = run_main_alone("care_vllm.loadtest.cli", tmp_path / "no-original", calib_file.parent, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"care-bench: error: {tmp_path / 'no-original'} is not a checkpoint folder (no config.json)"
    assert not torch_imported and not out.exists()


def test_the_summary_gives_the_servers_settings_and_no_ratio_over_a_chunked_stream():
    """From the committed SmolLM2 report: each server's `vllm serve` settings are in the summary (they were only in
    report.json), and a p50 TPOT of 0.004 ms (a stream whose tokens all came in one chunk, as vLLM measured on a
    tiny workload) gives 'n/a', not a ratio over it (the summary read 3224.94x)."""
    from care_vllm.loadtest.report import summary_markdown

    rep = json.loads((ROOT / "benchmarks" / "results" / "care_bench_smollm2" / "report.json").read_text())
    rep["models"]["original"]["levels"][0]["result"]["p50_tpot_ms"] = 0.0039
    text = summary_markdown(rep)
    assert "- original server: `vllm serve` with `--dtype float32 --kv-cache-memory-bytes 1G`" in text
    assert "- converted server: `vllm serve` with `--dtype float32 --kv-cache-memory-bytes 1G`" in text
    rows = [line for line in text.splitlines() if "**converted / original**" in line]
    assert rows[0].split(" | ")[2:5] == ["0.82x", "1.25x", "n/a"], rows[0]      # output tok/s, TTFT, TPOT
    assert rows[1].split(" | ")[2:5] == ["0.80x", "1.27x", "1.22x"], rows[1]
    rep["models"]["original"].update(server=None, base_url="http://127.0.0.1:8000")
    assert "- original server: running at http://127.0.0.1:8000 (not started here: its settings, KV budget " \
           "included, are not known)" in summary_markdown(rep)
