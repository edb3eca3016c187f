"""Load-based autoscaling: a step from 2 to 24 concurrent clients and back, `target_in_flight = 4`
(README "Autoscaling"). Prints the replica count over time, then one table: the time to reach the desired
count against its bound (upscale delay + one reconciler tick + load time), reversals of direction (flapping),
and the time back to the minimum against the downscale delay.

    .venv/bin/python bench/autoscale.py [--agents 3] [--slots 4] [--upscale 10] [--downscale 20] \\
        [--window 10] [--tick 2] [--sample 1] [--low 2] [--high 24] [--phase 45]

To run in about three minutes it uses delays shorter than the defaults (upscale 10 s, downscale 20 s, window
10 s, reconciler tick 2 s, samples every 1 s) — the rule's delays through the same service as the API, the
window and tick as the control loops' settings. The control loops (sampler and reconciler) run in this
process on the real clock; the clients are closed loops (send, wait for the answer, send again) to a control
plane with one uvicorn worker; the echo backend answers each request in about `--request-ms` and loads in
`--load-ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import sys
import threading
import time
from itertools import pairwise

from gateway_overhead import Cluster, _setup_django, pin_to_this_run


def control_loops(stop: threading.Event, sample_every: float, tick_every: float, errors: list[str]) -> None:
    """The sampler and the reconciler on their intervals, as Celery beat would run them."""
    from django.db import connections
    from django.utils import timezone

    from scheduling.autoscale import inflight_sample_take
    from scheduling.reconciler import reconcile_tick

    next_sample = next_tick = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        try:
            if now >= next_sample:
                inflight_sample_take(now=timezone.now())
                next_sample += sample_every
            if now >= next_tick:
                reconcile_tick()
                next_tick += tick_every
        except Exception as error:  # the bench reports it; the loops go on
            errors.append(repr(error))
        stop.wait(max(0.0, min(next_sample, next_tick) - time.monotonic()))
    connections.close_all()


async def clients(url: str, model: str, schedule: list[tuple[float, int]], done: dict) -> None:
    """Closed-loop clients: `schedule` is [(start second, clients)], the last entry's end is `done['end']`."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": "a b c d e f g h i j"}],
        "max_tokens": 10,
    }
    started = time.monotonic()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client(index: int) -> None:
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= done["end"]:
                    return
                wanted = next(count for start, count in reversed(schedule) if elapsed >= start)
                if index >= wanted:
                    await asyncio.sleep(0.1)
                    continue
                try:
                    answer = await http.post("/v1/chat/completions", json=body)
                    done["ok" if answer.status_code == 200 else "failed"] += 1
                except httpx.HTTPError:
                    done["failed"] += 1

        await asyncio.gather(*(client(i) for i in range(max(count for _, count in schedule))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4, help="replicas of the model per agent")
    parser.add_argument("--target", type=int, default=4, help="the rule's target_in_flight")
    parser.add_argument("--upscale", type=int, default=10, help="the rule's upscale_delay (s)")
    parser.add_argument("--downscale", type=int, default=20, help="the rule's downscale_delay (s)")
    parser.add_argument("--window", type=float, default=10, help="LOCALAI_AUTOSCALE_WINDOW (s)")
    parser.add_argument("--tick", type=float, default=2, help="reconciler interval (s)")
    parser.add_argument("--sample", type=float, default=1, help="sampler interval (s)")
    parser.add_argument("--low", type=int, default=2, help="clients before and after the step")
    parser.add_argument("--high", type=int, default=24, help="clients during the step")
    parser.add_argument("--phase", type=float, default=45, help="seconds of each phase (low, high, low)")
    parser.add_argument("--request-ms", type=int, default=2000, help="echo's time per answer")
    parser.add_argument("--load-ms", type=int, default=1000, help="echo's LoadModel time")
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/autoscale.py " + shlex.join(sys.argv[1:]))
    os.environ["LOCALAI_AUTOSCALE_WINDOW"] = str(args.window)
    os.environ["LOCALAI_AUTOSCALE_SAMPLE_INTERVAL"] = str(args.sample)
    _setup_django()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("scheduling").setLevel(logging.WARNING)
    from django.conf import settings
    from django.utils import timezone

    from nodes.models import ModelReplica
    from scheduling.autoscale import inflight_averages
    from scheduling.catalog import model_config_upsert
    from scheduling.choices import Trigger
    from scheduling.models import PlacementDecision, SchedulingRule
    from scheduling.services import rule_upsert

    assert args.window == settings.LOCALAI_AUTOSCALE_WINDOW
    suffix = os.getpid()
    model = f"bench-autoscale-{suffix}"
    cluster = Cluster(workers=1)
    stop = threading.Event()
    loop_errors: list[str] = []
    try:
        for index in range(args.agents):
            cluster.add_agent(f"bench-as-{suffix}-{index}", slots=args.slots, labels=f"bench={suffix}")
        cluster.wait_agents()
        delay = max(1, args.request_ms // 10)  # 10 tokens per answer
        model_config_upsert(
            name=model, backend="echo", options={"options": [f"delay_ms:{delay}", f"load_ms:{args.load_ms}"]}
        )
        pin_to_this_run([model], suffix)
        rule_upsert(
            model_name=model,
            node_selector={"bench": str(suffix)},
            min_replicas=1,
            max_replicas=0,
            target_in_flight=args.target,
            upscale_delay=args.upscale,
            downscale_delay=args.downscale,
        )
        loops = threading.Thread(
            target=control_loops, args=(stop, args.sample, args.tick, loop_errors), daemon=True
        )
        loops.start()
        while not ModelReplica.objects.filter(model_name=model, state="loaded").exists():
            time.sleep(0.2)
        print(
            f"control plane {cluster.url}, {args.agents} agents x {args.slots} slots; target_in_flight "
            f"{args.target}, upscale_delay {args.upscale} s, downscale_delay {args.downscale} s, window "
            f"{args.window:g} s, tick {args.tick:g} s, samples every {args.sample:g} s; logs in {cluster.log_dir}"
        )
        schedule = [(0.0, args.low), (args.phase, args.high), (2 * args.phase, args.low)]
        done = {"end": 3 * args.phase, "ok": 0, "failed": 0}
        runner = threading.Thread(target=lambda: asyncio.run(clients(cluster.url, model, schedule, done)))
        started = time.monotonic()
        wall_start = timezone.now()
        runner.start()
        series: list[tuple[float, int, float, int, int]] = []  # t, clients, avg, in-flight, live replicas
        print(f"{'t (s)':>6} {'clients':>7} {'avg in-flight':>13} {'in flight':>9} {'replicas':>8}")
        while runner.is_alive():
            t = time.monotonic() - started
            count = next(c for s, c in reversed(schedule) if t >= s)
            rows = list(
                ModelReplica.objects.filter(model_name=model, state__in=["loading", "loaded"]).values_list(
                    "in_flight", flat=True
                )
            )
            load = inflight_averages(model_names=[model], now=timezone.now()).get(model)
            series.append((t, count, load.average if load else 0.0, sum(rows), len(rows)))
            if int(t) % 3 == 0 and (len(series) < 2 or int(series[-2][0]) != int(t)):
                print(f"{t:6.0f} {count:7d} {series[-1][2]:13.1f} {sum(rows):9d} {len(rows):8d}")
            time.sleep(0.5)
        runner.join()
        # Let the tail finish: back to the minimum after the downscale delay.
        tail_end = time.monotonic() + args.window + args.downscale + 4 * args.tick
        while time.monotonic() < tail_end:
            t = time.monotonic() - started
            live = ModelReplica.objects.filter(model_name=model, state__in=["loading", "loaded"]).count()
            series.append((t, 0, 0.0, 0, live))
            if live == 1:
                break
            time.sleep(0.5)
        stop.set()
        loops.join(30)

        desired_high = math.ceil(args.high / args.target)
        up_at = next((t for t, _c, _a, _i, n in series if t >= args.phase and n >= desired_high), None)
        down_at = next((t for t, _c, _a, _i, n in series if t >= 2 * args.phase and n <= 1), None)
        counts = [n for _t, _c, _a, _i, n in series]
        moves = [b - a for a, b in pairwise(counts) if b != a]
        reversals = sum(1 for a, b in pairwise(moves) if (a > 0) != (b > 0))
        peak = max(counts)
        loads = [
            (r.loaded_at - r.load_started_at).total_seconds()
            for r in ModelReplica.objects.filter(model_name=model).exclude(loaded_at=None)
        ]
        records = PlacementDecision.objects.filter(
            model_name=model, trigger=Trigger.AUTOSCALE, created_at__gte=wall_start
        ).order_by("id")
        placed_records = [r for r in records if r.outcome == "placed"]
        load_time = max([r.duration for r in placed_records] + loads, default=args.load_ms / 1000)
        bound_up = args.upscale + args.tick + load_time
        print()
        print(
            f"| step {args.low} → {args.high} → {args.low} clients, target {args.target} | measured | bound |"
        )
        print("|---|---:|---:|")
        print(f"| desired at {args.high} clients | {desired_high} replicas (peak {peak}) | — |")
        # Demand is visible once the window's average calls for more than the minimum (the window's lag).
        seen_at = next((t for t, _c, a, _i, _n in series if t >= args.phase and a > args.target), None)
        up = f"{up_at - args.phase:.1f} s" if up_at is not None else "not reached"
        print(f"| time to reach {desired_high} replicas after the step up | {up} | — |")
        lag = f"{seen_at - args.phase:.1f} s" if seen_at is not None else "never"
        print(f"| … of which the window's lag (average above the target) | {lag} | — |")
        after = f"{up_at - seen_at:.1f} s" if up_at is not None and seen_at is not None else "—"
        print(
            f"| … from the demand seen to {desired_high} replicas | {after} | ≤ {bound_up:.1f} s "
            f"(upscale {args.upscale} + tick {args.tick:g} + load {load_time:.1f}) |"
        )
        print(f"| direction reversals (flapping: more than 1) | {reversals} | 1 |")
        down = f"{down_at - 2 * args.phase:.1f} s" if down_at is not None else "not reached"
        print(
            f"| time back to 1 replica after the step down | {down} | ≥ downscale {args.downscale} s, "
            f"+ window lag + tick {args.tick:g} + the retired replicas' last requests ({args.request_ms} ms) |"
        )
        print(f"| requests answered / failed | {done['ok']} / {done['failed']} | — / 0 |")
        print(
            f"| autoscale decision records (placed / trimmed) | {len(placed_records)} / "
            f"{sum(1 for r in records if r.outcome == 'trimmed')} | — |"
        )
        for record in records:
            print(f"  {record.created_at:%H:%M:%S} {record.outcome}: {record.message}")
        if loop_errors:
            print(f"control loop errors: {loop_errors[:3]}")
    finally:
        stop.set()
        cluster.stop()
        SchedulingRule.objects.filter(model_name=model).delete()


if __name__ == "__main__":
    main()
