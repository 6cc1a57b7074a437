"""Markdown tables: servers side by side with ratios to vlserve, and a concurrency sweep.

With several runs of the same (workload, concurrency, server), each table shows the run
with the highest req/s (vLLM's published CPU figures are also best-of-several) and lists
every run's req/s beside it, so the spread is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.loadgen.metrics import Summary
from bench.loadgen.rss_sampler import CPU_ROLES

REFERENCE = "vlserve"


def _num(value: float, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference or math.isnan(reference) or math.isnan(value):
        return "–"
    return f"{value / reference:.2f}×"


def best_runs(summaries: Sequence[Summary]) -> list[tuple[Summary, list[Summary]]]:
    """For each (workload, concurrency, server): its best run by req/s and all its runs,
    ordered by workload (first seen), concurrency, then vlserve first and the rest as seen."""
    groups: dict[tuple[str, int, str], list[Summary]] = {}
    for s in summaries:
        groups.setdefault((s.workload, s.concurrency, s.server), []).append(s)
    workloads = list(dict.fromkeys(s.workload for s in summaries))
    servers = list(dict.fromkeys([REFERENCE, *(s.server for s in summaries)]))
    keys = sorted(groups, key=lambda k: (workloads.index(k[0]), k[1], servers.index(k[2])))
    return [(max(groups[k], key=lambda s: s.request_throughput), groups[k]) for k in keys]


def _all_runs(runs: list[Summary]) -> str:
    return " / ".join(_num(s.request_throughput, 1) for s in runs)


def comparison_table(summaries: Sequence[Summary]) -> str:
    """One row per (workload, concurrency, server); ratios are this server ÷ vlserve at the
    same workload and concurrency (a baseline at 0.50× has half vlserve's figure)."""
    rows = best_runs(summaries)
    reference = {(best.workload, best.concurrency): best for best, _ in rows if best.server == REFERENCE}
    lines = [
        "| workload | conc. | server | ok / failed | req/s | req/s vs vlserve | req/s of each run | out tok/s"
        " | mean TTFT ms | p99 TTFT ms | mean TPOT ms | p99 ITL ms | median E2E ms | /health p50 ms"
        " | /health p99 ms | /health max ms | /health p99 vs vlserve | loop lag p99 ms | peak RSS MiB"
        " | peak PSS MiB | server CPU ms/req | other CPU % | stolen CPU % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, runs in rows:
        ref = reference.get((s.workload, s.concurrency))
        ref_rps = ref.request_throughput if ref else None
        lines.append(
            f"| {s.workload} | {s.concurrency} | {s.server} | {s.successful} / {s.failed + s.cut_off}"
            f" | {_num(s.request_throughput, 2)} | {_ratio(s.request_throughput, ref_rps)} | {_all_runs(runs)}"
            f" | {_num(s.output_throughput, 0)} | {_num(s.mean_ttft_ms, 0)} | {_num(s.p99_ttft_ms, 0)}"
            f" | {_num(s.mean_tpot_ms, 1)} | {_num(s.p99_itl_ms, 0)} | {_num(s.median_e2el_ms, 0)}"
            f" | {_num(s.health_p50_ms, 1)} | {_num(s.health_p99_ms, 1)} | {_num(s.health_max_ms, 1)}"
            f" | {_ratio(s.health_p99_ms, ref.health_p99_ms if ref else None)} | {_num(s.loop_lag_p99_ms, 1)}"
            f" | {_num(s.peak_rss_mib, 0)} | {_num(s.peak_pss_mib, 0)} | {_num(s.server_cpu_ms_per_request, 0)}"
            f" | {_num(s.foreign_cpu_pct, 0)} | {_num(s.steal_cpu_pct, 0)} |"
        )
    return "\n".join(lines)


def sweep_table(summaries: Sequence[Summary]) -> str:
    """How each server's req/s and /health latency change as concurrency grows; the
    "vs lowest" column is req/s ÷ req/s at the lowest concurrency of the same server."""
    lines = [
        "| workload | server | conc. | req/s | req/s vs lowest conc. | /health p50 ms | /health p99 ms"
        " | /health max ms | loop lag p50 ms | loop lag p99 ms | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = sorted((b for b, _ in best_runs(summaries)), key=lambda s: (s.workload, s.server, s.concurrency))
    lowest: dict[tuple[str, str], Summary] = {}
    for s in best:
        first = lowest.setdefault((s.workload, s.server), s)
        lines.append(
            f"| {s.workload} | {s.server} | {s.concurrency} | {_num(s.request_throughput, 2)}"
            f" | {_ratio(s.request_throughput, first.request_throughput)} | {_num(s.health_p50_ms, 1)}"
            f" | {_num(s.health_p99_ms, 1)} | {_num(s.health_max_ms, 1)} | {_num(s.loop_lag_p50_ms, 1)}"
            f" | {_num(s.loop_lag_p99_ms, 1)} | {_num(s.peak_rss_mib, 0)} |"
        )
    return "\n".join(lines)


def probe_table(summaries: Sequence[Summary]) -> str:
    """/health during each burst by both probers (keep-alive and a new TCP connection per
    probe), the same probers' p99 and max against a do-nothing server during the same burst
    (the floor) and each p99 as a multiple of the floor's, with the server's own scheduler passes per
    probe where it reports them (vlserve; bench/README.md), and the server's CPU per request
    by part of its process tree (front end / engine worker / prep processes; a baseline is
    one process, all front end)."""
    lines = [
        (
            "| workload | conc. | server | keep-alive p50 / p99 / max ms | fresh p50 / p99 / max ms"
            " | floor p99 / max keep-alive; fresh ms | p99 × floor keep-alive / fresh"
            " | passes/probe keep-alive | passes/probe fresh | CPU ms/req front end / engine / prep |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, _ in best_runs(summaries):
        lines.append(
            f"| {s.workload} | {s.concurrency} | {s.server}"
            f" | {_num(s.health_p50_ms)} / {_num(s.health_p99_ms)} / {_num(s.health_max_ms)}"
            f" | {_num(s.fresh_health_p50_ms)} / {_num(s.fresh_health_p99_ms)} / {_num(s.fresh_health_max_ms)}"
            f" | {_num(s.floor_p99_ms)} / {_num(s.floor_max_ms)}; {_num(s.floor_fresh_p99_ms)} / {_num(s.floor_fresh_max_ms)}"
            f" | {_ratio(s.health_p99_ms, s.floor_p99_ms)} / {_ratio(s.fresh_health_p99_ms, s.floor_fresh_p99_ms)}"
            f" | {_num(s.probe_passes_keep_alive, 2)} | {_num(s.probe_passes_fresh, 2)}"
            f" | {' / '.join(_num(s.server_cpu_ms_by_role.get(role, math.nan)) for role in CPU_ROLES)} |"
        )
    return "\n".join(lines)


def prompt_tokens_line(summaries: Sequence[Summary]) -> str:
    """Mean prompt tokens per successful request (the servers' usage, image tokens
    included) for each (workload, server) of the best runs: shows which image-token
    setting the servers really ran with."""
    parts = []
    for s, _ in best_runs(summaries):
        mean = s.total_input_tokens / s.successful if s.successful and s.total_input_tokens else math.nan
        parts.append(f"{s.workload} c={s.concurrency} {s.server} {_num(mean, 0)}")
    return "mean prompt tokens per request: " + "; ".join(parts)
