"""The serving benchmark end to end, briefly, so it cannot rot.

Starts vlserve and the pr-style baseline as real processes on free 127.0.0.1 ports, runs
every workload with a handful of requests, and checks that the figures are real: every
request succeeded, throughput and latencies are positive, /health was probed during each
burst, memory was sampled, and the table, JSON and plot were written. No timing targets
are asserted (those are for the benchmark to show, not for tests).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the benchmark needs the 'bench' extra")
pytest.importorskip("uvicorn", reason="the benchmark needs the 'bench' extra")
pytest.importorskip("psutil", reason="the benchmark needs the 'bench' extra")
pytest.importorskip("matplotlib", reason="the benchmark needs the 'bench' extra")

from bench.launch.servers import REPO_ROOT, server_command
from bench.loadgen.options import LoadOptions
from bench.orchestrate import BenchmarkPlan, run_benchmark
from bench.report.health_plot import plot_health
from bench.report.results_files import write_results
from bench.report.tables import comparison_table, probe_table, sweep_table
from bench.serve import parse_args, plan_from_args
from bench.workloads.catalog import WORKLOADS

SERVERS = ("vlserve", "pr-style")
# A handful of short requests per run (each test changes what it needs with ``replace``).
SMOKE_OPTIONS = LoadOptions(
    concurrency=2,
    num_requests=3,
    warmup=1,
    max_tokens=4,
    max_seconds=30.0,
    grace_seconds=30.0,
    idle_probe_seconds=0.2,
)


async def test_every_workload_runs_against_vlserve_and_a_baseline(tmp_path, tiny_model_dir):
    options = SMOKE_OPTIONS
    plan = BenchmarkPlan(
        servers=SERVERS,
        workloads=WORKLOADS,
        concurrency_levels=(2,),
        options=options,
        image_dir=tmp_path / "images",
        log_dir=tmp_path / "logs",
        image_size=512,
        image_latency=0.01,
        model=str(tiny_model_dir),
    )
    runs = await run_benchmark(plan)

    assert [(run.server, run.workload) for run, _ in runs] == [(s, w) for s in SERVERS for w in WORKLOADS]
    for run, summary in runs:
        where = f"{summary.server}/{summary.workload}"
        assert summary.successful == 3 and summary.failed == 0 and summary.cut_off == 0, (where, summary.first_error)
        assert run.warmup_failures == 0, where
        assert {r.kind for r in run.results} <= {"text", "image-base64", "image-url"}
        assert summary.request_throughput > 0 and summary.output_throughput > 0, where
        assert summary.total_output_tokens == 3 * options.max_tokens, where  # ignore_eos: exact lengths
        for figure in (summary.mean_ttft_ms, summary.p99_ttft_ms, summary.mean_e2el_ms, summary.mean_tpot_ms):
            assert figure > 0 and math.isfinite(figure), where
        assert summary.health_probes >= 1 and summary.health_failures == 0, where
        assert 0 < summary.health_p50_ms <= summary.health_p99_ms <= summary.health_max_ms, where
        assert summary.fresh_health_probes >= 1 and summary.fresh_health_failures == 0, where
        assert 0 < summary.fresh_health_p50_ms <= summary.fresh_health_p99_ms, where
        # the do-nothing server beside the burst was probed the same two ways (the floor)
        assert math.isfinite(summary.floor_p99_ms) and math.isfinite(summary.floor_fresh_p99_ms), where
        assert (
            summary.floor_max_ms >= summary.floor_p99_ms and summary.floor_fresh_max_ms >= summary.floor_fresh_p99_ms
        ), where
        assert summary.peak_rss_mib > 50, where
        if summary.server == "vlserve":  # the server's own count (VLSERVE_PROBE_PASSES_FILE)
            # every probe answered by the probe lane (its process), off the loop: no pass at all
            assert summary.probe_passes_keep_alive == 0.0, where
            assert summary.probe_passes_fresh == 0.0, where
            # CPU by part of the tree: the server process, its engine worker, its prep processes
            assert set(summary.server_cpu_ms_by_role) == {"front end", "engine", "prep"}, where
        else:
            assert math.isnan(summary.probe_passes_keep_alive), where
            assert "engine" not in summary.server_cpu_ms_by_role, where  # one process
        assert sum(summary.server_cpu_ms_by_role.values()) == pytest.approx(summary.server_cpu_ms_per_request), where
    mixed = next(run for run, _ in runs if run.workload == "mixed")
    assert {r.kind for r in mixed.results} == {"text", "image-base64", "image-url"}

    summaries = [s for _, s in runs]
    table = comparison_table(summaries)
    for workload in WORKLOADS:
        assert f"| {workload} | 2 | vlserve | 3 / 0 |" in table
        assert f"| {workload} | 2 | pr-style | 3 / 0 |" in table
    assert "| text | vlserve | 2 |" in sweep_table(summaries)
    assert "| text | 2 | vlserve |" in probe_table(summaries)

    paths = write_results(tmp_path / "out" / "smoke", command="smoke", meta={}, runs=runs, markdown=table)
    record = json.loads(paths[0].read_text())
    assert len(record["runs"]) == len(runs) and record["runs"][0]["health"]
    png = plot_health([run for run, _ in runs if run.workload == "image-url"], tmp_path / "out" / "health.png", "smoke")
    assert png.read_bytes().startswith(b"\x89PNG")


async def test_real_image_sizes_run_against_vlserve(tmp_path, real_size_tiny_model_dir):
    """``image_tokens="real"``: vlserve serves the tiny model at Qwen2-VL's default image
    limits with pixel slots sized for the benchmark's images (32 MiB, not max_pixels' 308),
    and every 1024² image reaches the model as 1,369 image tokens (the server's usage).
    vlserve only, to keep it short: the baselines get the same ``--model`` and no slots."""
    options = replace(SMOKE_OPTIONS, num_requests=2, max_seconds=60.0, grace_seconds=60.0)
    plan = BenchmarkPlan(
        servers=("vlserve",),
        workloads=("image-base64",),
        concurrency_levels=(2,),
        options=options,
        image_dir=tmp_path / "images",
        log_dir=tmp_path / "logs",
        image_size=1024,
        model=str(real_size_tiny_model_dir),
        image_tokens="real",
    )
    runs = await run_benchmark(plan)

    [(run, summary)] = runs
    assert summary.successful == 2 and summary.failed == 0, summary.first_error
    assert run.warmup_failures == 0
    per_request = summary.total_input_tokens / summary.successful
    assert 1369 < per_request < 1369 + 100  # the image, the chat template, a question
    vlserve_log = next((tmp_path / "logs").glob("vlserve-*.log")).read_text()
    assert "Traceback" not in vlserve_log


async def test_non_streaming_requests_run_against_vlserve_and_a_baseline(tmp_path, tiny_model_dir):
    """``stream=False`` (``--no-stream``): both servers answer every non-streaming request,
    the load generator records each as one whole response (TTFT is the latency, vLLM's TPOT
    and ITL 0) with the servers' usage counts (``ignore_eos``: exactly ``max_tokens``)."""
    options = replace(SMOKE_OPTIONS, stream=False)
    plan = BenchmarkPlan(
        servers=SERVERS,
        workloads=("text",),
        concurrency_levels=(2,),
        options=options,
        image_dir=tmp_path / "images",
        log_dir=tmp_path / "logs",
        model=str(tiny_model_dir),
    )
    runs = await run_benchmark(plan)

    assert [run.server for run, _ in runs] == list(SERVERS)
    for run, summary in runs:
        where = summary.server
        assert summary.successful == 3 and summary.failed == 0 and summary.cut_off == 0, (where, summary.first_error)
        assert run.warmup_failures == 0, where
        assert summary.mode == "closed-loop, non-streaming", where
        for result in run.results:
            assert result.ok and result.status == 200, (where, result.error)
            assert result.output_tokens == options.max_tokens and result.prompt_tokens > 10, where
            assert result.chunk_times == [result.ended] and result.ttft == result.e2e > 0, where
        assert summary.total_output_tokens == 3 * options.max_tokens, where
        assert summary.mean_ttft_ms == pytest.approx(summary.mean_e2el_ms), where
        assert summary.mean_tpot_ms == 0.0 and summary.p99_itl_ms == 0.0, where
    # both servers tokenized the same prompts the same way
    prompt_tokens = {run.server: sorted(r.prompt_tokens for r in run.results) for run, _ in runs}
    assert prompt_tokens["vlserve"] == prompt_tokens["pr-style"]


def _marked_copy(tree: Path) -> Path:
    """A copy of vlserve's packages in ``tree`` whose ``server`` and ``engine`` packages
    each leave a file named ``imported-by-<pid>`` beside themselves when imported."""
    marker = "\nimport os as _os, pathlib as _pathlib\n" + (
        "_pathlib.Path(__file__).with_name(f'imported-by-{_os.getpid()}').touch()\n"
    )
    for package in ("server", "engine", "vl"):
        shutil.copytree(REPO_ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("server", "engine"):
        init = tree / package / "__init__.py"
        init.write_text(init.read_text() + marker)
    return tree


async def test_a_vlserve_variant_runs_the_code_of_another_source_tree(tmp_path, tiny_model_dir):
    """``vlserve@copy`` with ``sources=(("copy", DIR),)`` (``--source copy=DIR``): the server
    process and its engine worker process both import DIR's code, not this checkout's,
    and the run is measured like any other.
    The command line accepts that name only with its ``--source``."""
    copy = _marked_copy(tmp_path / "copy")
    plan = BenchmarkPlan(
        servers=("vlserve@copy", "vlserve"),
        workloads=("text",),
        concurrency_levels=(2,),
        options=SMOKE_OPTIONS,
        image_dir=tmp_path / "images",
        log_dir=tmp_path / "logs",
        model=str(tiny_model_dir),
        sources=(("copy", copy),),
    )
    runs = await run_benchmark(plan)

    assert [run.server for run, _ in runs] == ["vlserve@copy", "vlserve"]
    for run, summary in runs:
        assert summary.successful == 3 and summary.failed == 0, (run.server, summary.first_error)
    server_pids = {p.name for p in (copy / "server").glob("imported-by-*")}
    engine_pids = {p.name for p in (copy / "engine").glob("imported-by-*")}
    assert server_pids and engine_pids - server_pids, "the engine worker process did not import the copy"

    args = parse_args(["--servers", "vlserve@copy,pr-style", "--source", f"copy={copy}"])
    assert plan_from_args(args).sources == (("copy", copy.resolve()),)
    assert server_command("vlserve@copy", 8000)[1:] == server_command("vlserve", 8000)[1:]
    with pytest.raises(SystemExit):
        parse_args(["--servers", "vlserve@copy"])  # no --source copy=DIR
    with pytest.raises(SystemExit):
        parse_args(["--servers", "vlserve", "--source", f"copy={tmp_path / 'images'}"])  # not a source tree
