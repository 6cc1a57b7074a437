"""Summarise a ``LoadRun`` under vLLM's benchmark labels, plus /health and memory figures."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.loadgen.run import CUT_OFF, LoadRun

MIB = 1024 * 1024


def _ms(values: list[float], q: float | None = None) -> float:
    """Mean (``q`` None) or the ``q``-th percentile of ``values``, in ms; NaN if empty."""
    if not values:
        return float("nan")
    arr = np.asarray(values) * 1000.0
    return float(arr.mean() if q is None else np.percentile(arr, q))


@dataclass(frozen=True)
class Summary:
    server: str
    workload: str
    mode: str
    concurrency: int
    successful: int
    failed: int
    cut_off: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_output_tokens: int
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    p99_e2el_ms: float
    health_probes: int
    health_failures: int
    health_idle_p50_ms: float
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    rss_before_mib: float
    peak_rss_mib: float
    foreign_cpu_pct: float
    repeat: int
    first_error: str | None
    # probes on a new TCP connection each (the Kubernetes way), during the burst
    fresh_health_probes: int = 0
    fresh_health_failures: int = 0
    fresh_health_p50_ms: float = math.nan
    fresh_health_p99_ms: float = math.nan
    fresh_health_max_ms: float = math.nan
    # the server's scheduler passes per probe, mean over its lifetime (vlserve only:
    # VLSERVE_PROBE_PASSES_FILE; filled in once the server has stopped)
    probe_passes_keep_alive: float = math.nan
    probe_passes_fresh: float = math.nan
    # the server's process tree (engine worker and prep processes included): CPU
    # milliseconds per successful request during the burst
    server_cpu_ms_per_request: float = math.nan
    # the same per part of the tree (``rss_sampler.CPU_ROLES``; a baseline has only "front end")
    server_cpu_ms_by_role: dict[str, float] = field(default_factory=dict)
    # the process tree's peak proportional set size (shared pages split, not counted per process)
    peak_pss_mib: float = math.nan
    # the do-nothing server's probes during the same burst (bench/floor_server.py)
    floor_p99_ms: float = math.nan
    floor_fresh_p99_ms: float = math.nan
    floor_max_ms: float = math.nan
    floor_fresh_max_ms: float = math.nan
    loop_lag_p50_ms: float = float("nan")
    loop_lag_p99_ms: float = float("nan")
    loop_lag_samples: int = 0
    # prompt tokens of the successful requests, from the servers' usage (image tokens included)
    total_input_tokens: int = 0
    # the hypervisor's stolen share of the machine during the burst (cpu_account.py)
    steal_cpu_pct: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)

    def vllm_report(self) -> str:
        """The run in vLLM ``benchmark_serving``'s layout (same labels, same units)."""
        rows = [
            ("Successful requests:", f"{self.successful}"),
            ("Failed requests:", f"{self.failed}"),
            ("Benchmark duration (s):", f"{self.duration_s:.2f}"),
            ("Total input tokens:", f"{self.total_input_tokens}"),
            ("Total generated tokens:", f"{self.total_output_tokens}"),
            ("Request throughput (req/s):", f"{self.request_throughput:.2f}"),
            ("Output token throughput (tok/s):", f"{self.output_throughput:.2f}"),
        ]
        for title, key in (
            ("Time to First Token", "ttft"),
            ("Time per Output Token (excl. 1st token)", "tpot"),
            ("Inter-token Latency", "itl"),
            ("End-to-end Latency", "e2el"),
        ):
            rows.append((f"---{title}---", ""))
            for stat in ("mean", "median", "p99"):
                label = stat.capitalize() if stat != "p99" else "P99"
                rows.append((f"{label} {key.upper()} (ms):", f"{getattr(self, f'{stat}_{key}_ms'):.2f}"))
        rows.append(("---/health (every 20 ms, own connection)---", ""))
        rows += [
            ("Probes (failed):", f"{self.health_probes} ({self.health_failures})"),
            ("Idle P50 (ms):", f"{self.health_idle_p50_ms:.2f}"),
            (
                "P50 / P99 / Max (ms):",
                f"{self.health_p50_ms:.2f} / {self.health_p99_ms:.2f} / {self.health_max_ms:.2f}",
            ),
            ("Fresh connection probes (failed):", f"{self.fresh_health_probes} ({self.fresh_health_failures})"),
            (
                "Fresh P50 / P99 / Max (ms):",
                f"{self.fresh_health_p50_ms:.2f} / {self.fresh_health_p99_ms:.2f} / {self.fresh_health_max_ms:.2f}",
            ),
            ("Peak RSS (MiB, before burst):", f"{self.peak_rss_mib:.0f} ({self.rss_before_mib:.0f})"),
            ("Other processes' CPU (% of machine):", f"{self.foreign_cpu_pct:.0f}"),
            ("CPU stolen by the hypervisor (% of machine):", f"{self.steal_cpu_pct:.0f}"),
            ("Server CPU ms per request (its process tree):", f"{self.server_cpu_ms_per_request:.1f}"),
            *((f"  of which {role}:", f"{ms:.1f}") for role, ms in self.server_cpu_ms_by_role.items()),
            ("Peak PSS of the server's process tree (MiB):", f"{self.peak_pss_mib:.0f}"),
        ]
        head = f" {self.server} · {self.workload} · {self.mode} · c={self.concurrency} · run {self.repeat + 1} "
        width = 50
        lines = [head.center(width, "=")]
        lines += [f"{label:<40}{value:>10}" if value else label for label, value in rows]
        return "\n".join([*lines, "=" * width])


def burst_health(run: LoadRun, *, fresh: bool = False) -> list[tuple[float, float, int]]:
    """Keep-alive (or ``fresh``-connection) probes sent during the burst."""
    return _during_burst(run, run.health_fresh if fresh else run.health)


def _during_burst(run: LoadRun, samples: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    return [s for s in samples if run.burst_started <= s[0] <= run.burst_ended]


def with_probe_passes(summary: Summary, passes_file: Path) -> Summary:
    """``summary`` with the server's scheduler passes per probe from ``passes_file`` (the
    JSON ``vlserve serve`` writes at exit, see bench/README.md); unchanged if there is none."""
    try:
        passes = json.loads(passes_file.read_text())
    except (FileNotFoundError, ValueError):
        return summary
    return replace(
        summary,
        probe_passes_keep_alive=passes["keep_alive"].get("mean", math.nan),
        probe_passes_fresh=passes["fresh"].get("mean", math.nan),
    )


def summarise(run: LoadRun) -> Summary:
    ok = [r for r in run.results if r.ok]
    cut = [r for r in run.results if r.error == CUT_OFF]
    duration = max(run.burst_ended - run.burst_started, 1e-9)
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [gap for r in ok for gap in r.itls]
    if ok and not run.options.stream:
        # one chunk per request, so no gaps: vLLM's benchmark_serving reports np.mean(itls or 0),
        # i.e. 0, and so does this (TPOT is 0 by its formula: ttft == e2e, see complete_chat)
        itls = [0.0]
    e2es = [r.e2e for r in ok]
    during = burst_health(run)
    latencies = [s[1] for s in during]
    idle = [s[1] for s in run.health if s[0] < run.warmup_started]
    failed = [r for r in run.results if not r.ok]
    fresh = burst_health(run, fresh=True)
    fresh_latencies = [s[1] for s in fresh]
    floor = [s[1] for s in _during_burst(run, run.floor_health)]
    floor_fresh = [s[1] for s in _during_burst(run, run.floor_health_fresh)]
    return Summary(
        server=run.server,
        workload=run.workload,
        mode=run.options.mode,
        concurrency=run.options.concurrency,
        successful=len(ok),
        failed=len(failed) - len(cut),
        cut_off=len(cut),
        duration_s=duration,
        request_throughput=len(ok) / duration,
        output_throughput=tokens / duration,
        total_output_tokens=tokens,
        total_input_tokens=sum(r.prompt_tokens for r in ok),
        mean_ttft_ms=_ms(ttfts),
        median_ttft_ms=_ms(ttfts, 50),
        p99_ttft_ms=_ms(ttfts, 99),
        mean_tpot_ms=_ms(tpots),
        median_tpot_ms=_ms(tpots, 50),
        p99_tpot_ms=_ms(tpots, 99),
        mean_itl_ms=_ms(itls),
        median_itl_ms=_ms(itls, 50),
        p99_itl_ms=_ms(itls, 99),
        mean_e2el_ms=_ms(e2es),
        median_e2el_ms=_ms(e2es, 50),
        p99_e2el_ms=_ms(e2es, 99),
        health_probes=len(during),
        health_failures=sum(1 for s in during if s[2] != 200),
        health_idle_p50_ms=_ms(idle, 50),
        health_p50_ms=_ms(latencies, 50),
        health_p99_ms=_ms(latencies, 99),
        health_max_ms=max(latencies) * 1000.0 if latencies else float("nan"),
        rss_before_mib=run.rss_before / MIB,
        peak_rss_mib=max((s[1] for s in run.rss), default=run.rss_before) / MIB,
        foreign_cpu_pct=100.0 * run.foreign_cpu,
        steal_cpu_pct=100.0 * run.steal_cpu,
        peak_pss_mib=max((s[1] for s in run.pss), default=math.nan * MIB) / MIB,
        server_cpu_ms_per_request=1000.0 * run.server_cpu_seconds / len(ok) if ok else math.nan,
        server_cpu_ms_by_role={role: 1000.0 * s / len(ok) for role, s in run.server_cpu_by_role.items()} if ok else {},
        repeat=run.repeat,
        first_error=next((r.error for r in failed if r.error), None),
        floor_p99_ms=_ms(floor, 99),
        floor_fresh_p99_ms=_ms(floor_fresh, 99),
        floor_max_ms=_ms(floor, 100),
        floor_fresh_max_ms=_ms(floor_fresh, 100),
        fresh_health_probes=len(fresh),
        fresh_health_failures=sum(1 for s in fresh if s[2] != 200),
        fresh_health_p50_ms=_ms(fresh_latencies, 50),
        fresh_health_p99_ms=_ms(fresh_latencies, 99),
        fresh_health_max_ms=max(fresh_latencies) * 1000.0 if fresh_latencies else float("nan"),
        loop_lag_p50_ms=run.loop_lag_p50_ms,
        loop_lag_p99_ms=run.loop_lag_p99_ms,
        loop_lag_samples=run.loop_lag_samples,
    )
