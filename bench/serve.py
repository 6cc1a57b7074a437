"""The serving benchmark: vlserve against LMDeploy-style baselines on one workload.

    python -m bench.serve --workload image-url --concurrency 64 --num-requests 256 \\
        --servers vlserve,pr-style,main-style
    python -m bench.serve --workload text --concurrency 32,64,128    # a concurrency sweep
    python -m bench.serve --workload text --concurrency 64 --no-stream  # non-streaming requests

Starts each server in turn on a free 127.0.0.1 port, sends a warm-up and then the measured
burst of streaming chat completions (non-streaming ones with --no-stream; closed loop, or
Poisson with --request-rate), probes /health every 20 ms from its own process (keep-alive
and a new connection per probe), samples the server's RSS and its scheduler passes per
probe (vlserve), and prints vLLM-style reports and one Markdown table with ratios to
vlserve. Writes JSON, Markdown and a /health-over-time PNG under --results-dir. Every run
is bounded by --num-requests and --max-seconds; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import trio

from bench.launch.servers import DEFAULT_SERVERS, REPO_ROOT, SERVERS, known_server, source_label
from bench.loadgen.options import LoadOptions
from bench.orchestrate import BenchmarkPlan, run_benchmark, timestamp
from bench.report.health_plot import plot_health
from bench.report.provenance import provenance
from bench.report.results_files import write_results
from bench.report.tables import best_runs, comparison_table, probe_table, prompt_tokens_line, sweep_table
from bench.workloads.catalog import WORKLOADS, uses_images
from bench.workloads.image_store import default_image_dir
from bench.workloads.image_tokens import IMAGE_TOKEN_SETTINGS, ImageTokenSetting
from engine.config import EngineConfig


def _csv(kind, choices=None, accept=None):
    """A comma-separated list of ``kind``; each item in ``choices`` (or passing ``accept``)."""

    def parse(text: str):
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not items or (choices and any(i not in choices and not (accept and accept(i)) for i in items)):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list{' of ' + ', '.join(choices) if choices else ''}"
            )
        return tuple(items)

    return parse


def _source(text: str) -> tuple[str, Path]:
    """``LABEL=DIR``: a vlserve source tree for the servers named ``VARIANT@LABEL``."""
    label, _, directory = text.partition("=")
    path = Path(directory).expanduser().resolve()
    if not label or not (path / "server" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR with DIR a vlserve source tree, got {text!r}")
    return label, path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload", type=_csv(str, WORKLOADS), default=("text",), help=f"one or more of {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--servers",
        type=_csv(str, SERVERS, accept=known_server),
        default=DEFAULT_SERVERS,
        help=f"any of {', '.join(SERVERS)}, or VARIANT@LABEL: a vlserve variant running the code of --source LABEL",
    )
    parser.add_argument(
        "--source",
        type=_source,
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a vlserve source tree (e.g. a git worktree of another commit) for the servers named VARIANT@LABEL, "
        "to compare two versions side by side in one run",
    )
    parser.add_argument("--concurrency", type=_csv(int), default=(64,), help="one level, or several for a sweep")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (open loop)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    parser.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="send non-streaming chat completions (TTFT is then the whole latency, TPOT and ITL 0, as in vLLM)",
    )
    parser.add_argument(
        "--connection-per-request",
        action="store_true",
        help="send every request with 'Connection: close' (a new connection per request, as a client "
        "that drops it after [DONE] makes); default: each concurrent request keeps its own connection alive",
    )
    parser.add_argument("--max-seconds", type=float, default=180.0, help="stop issuing requests after this long")
    parser.add_argument("--image-latency", type=float, default=0.05, help="seconds the image server waits per image")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument(
        "--image-tokens",
        choices=IMAGE_TOKEN_SETTINGS,
        default="256",
        help="256: the tiny model's image processor caps an image at 256 tokens; real: every server serves "
        "the tiny model with Qwen2-VL's default max_pixels (a 1024² image: 1,369 tokens, 5,476 patches) "
        "and vlserve gets pixel slots sized for --image-size",
    )
    parser.add_argument("--image-dir", type=Path, default=None, help="image cache (default: ~/.cache/vlserve-bench)")
    parser.add_argument(
        "--vlserve-args",
        type=shlex.split,
        default=(),
        help="extra flags for 'vlserve serve', e.g. '--switch-interval 0.005'",
    )
    parser.add_argument("--model", default=None, help="model directory for every server (default: the tiny model)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run everything this many times (fresh servers); tables show the best run",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this long for other processes to go quiet",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="'quiet': other processes use less than this share of the CPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="shifts request indices (new images) and Poisson arrivals")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a new temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="no per-run vLLM-style reports")
    args = parser.parse_args(argv)
    labels = {label for label, _ in args.source}
    for name in args.servers:
        if source_label(name) is not None and source_label(name) not in labels:
            parser.error(f"server {name!r} needs --source {source_label(name)}=DIR")
    if args.image_tokens != "256" and args.model is not None:
        parser.error("--image-tokens real serves its own tiny model variant; leave out --model")
    if args.image_tokens != "256" and any(uses_images(w) for w in args.workload):
        tokens = ImageTokenSetting(args.image_tokens).image_tokens(args.image_size)
        room = EngineConfig().max_model_len - args.max_tokens - 128  # 128: the chat template and question
        if tokens > room:
            parser.error(
                f"a {args.image_size}² image is {tokens:,} image tokens at --image-tokens {args.image_tokens}: "
                f"more than the servers' max_model_len ({EngineConfig().max_model_len}) leaves room for"
            )
    return args


def plan_from_args(args: argparse.Namespace) -> BenchmarkPlan:
    options = LoadOptions(
        concurrency=args.concurrency[0],
        num_requests=args.num_requests,
        max_seconds=args.max_seconds,
        warmup=args.warmup,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        request_rate=args.request_rate,
        seed=args.seed,
        stream=args.stream,
        connection_per_request=args.connection_per_request,
    )
    return BenchmarkPlan(
        servers=args.servers,
        workloads=args.workload,
        concurrency_levels=args.concurrency,
        options=options,
        image_dir=args.image_dir or default_image_dir(args.image_size),
        log_dir=args.log_dir or Path(tempfile.mkdtemp(prefix="vlserve-bench-logs-")),
        image_size=args.image_size,
        image_latency=args.image_latency,
        model=args.model,
        first_index=args.seed * 100_000,
        repeats=args.repeats,
        vlserve_args=tuple(args.vlserve_args),
        quiet_threshold=args.quiet_threshold,
        quiet_wait=args.quiet_wait,
        image_tokens=args.image_tokens,
        sources=tuple(args.source),
    )


def request_mode_line(options: LoadOptions) -> str:
    """What kind of requests the run sent, and on which connections, for the line above the
    tables."""
    if options.stream:
        line = "requests: streaming chat completions (`stream_options.include_usage`)"
    else:
        line = (
            "requests: non-streaming chat completions (`--no-stream`): TTFT is the whole latency, "
            "TPOT and ITL are 0 (vLLM's convention), tokens are the servers' `usage`"
        )
    if options.connection_per_request:
        return line + "; a new connection per request (`--connection-per-request`)"
    return line + "; keep-alive connections, one per concurrent request"


def results_stem(results_dir: Path, plan: BenchmarkPlan, when: str) -> Path:
    """The results' path without its extension: time, workloads and levels, then
    ``-real-size`` for ``--image-tokens real``, ``-nostream`` for ``--no-stream`` and
    ``-newconn`` for ``--connection-per-request``."""
    stem = results_dir / f"{when}-{'+'.join(plan.workloads)}-c{'_'.join(map(str, plan.concurrency_levels))}"
    if plan.image_setting.name != "256":
        stem = stem.with_name(f"{stem.name}-{plan.image_setting.name}-size")
    if not plan.options.stream:
        stem = stem.with_name(f"{stem.name}-nostream")
    if plan.options.connection_per_request:
        stem = stem.with_name(f"{stem.name}-newconn")
    return stem


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = plan_from_args(args)
    command = "python -m bench.serve " + shlex.join(sys.argv[1:] if argv is None else argv)

    def progress(run, summary) -> None:
        if not args.quiet:
            print(summary.vllm_report(), flush=True)

    runs = trio.run(run_benchmark, plan, progress)
    summaries = [s for _, s in runs]
    setting = plan.image_setting
    markdown = f"{request_mode_line(plan.options)}\n\n"
    if any(uses_images(w) for w in plan.workloads):
        markdown += f"{setting.describe(plan.image_size)}; {prompt_tokens_line(summaries)}\n\n"
    markdown += comparison_table(summaries)
    markdown += "\n\n/health probes and scheduler passes per probe:\n\n" + probe_table(summaries)
    if len(plan.concurrency_levels) > 1:
        markdown += "\n\nConcurrency sweep:\n\n" + sweep_table(summaries)
    stem = results_stem(args.results_dir, plan, timestamp())
    meta = {
        "servers": plan.servers,
        "workloads": plan.workloads,
        "levels": plan.concurrency_levels,
        "image_tokens": setting.as_dict(plan.image_size),
        "stream": plan.options.stream,
        "connection_per_request": plan.options.connection_per_request,
        "sources": {label: str(path) for label, path in plan.sources},
        **provenance(REPO_ROOT),
    }
    paths = write_results(stem, command=command, meta=meta, runs=runs, markdown=markdown)
    best = {id(b) for b, _ in best_runs(summaries)}
    for workload in plan.workloads:
        picked = [run for run, s in runs if run.workload == workload and id(s) in best]
        paths.append(plot_health(picked, Path(f"{stem}-{workload}-health.png"), f"/health during the {workload} burst"))
    print(f"\n{command}\n\n{markdown}\n")
    print("wrote " + ", ".join(str(p) for p in paths) + f"\nserver logs in {plan.log_dir}")


if __name__ == "__main__":
    main()
