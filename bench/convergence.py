"""Convergence: a rule `min_replicas = 8` over 4 agents x 2 slots, each load taking 1 s (QUALITY.md target: all
8 replicas `loaded` within one tick + 2 s, the loads running in parallel across nodes).

    .venv/bin/python bench/convergence.py [--agents 4] [--slots 2] [--load-ms 1000] [--runs 3]

Real agents and echo backends on loopback; the reconciler tick runs in this process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

from gateway_overhead import Cluster, _setup_django


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--load-ms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/convergence.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    from nodes.models import ModelReplica
    from scheduling.catalog import model_config_upsert
    from scheduling.models import ModelConfig, SchedulingRule
    from scheduling.reconciler import reconcile_tick
    from scheduling.services import replica_stop_on_node

    suffix = os.getpid()
    target = args.agents * args.slots
    cluster = Cluster(workers=1)
    models = []
    try:
        for index in range(args.agents):
            # A label of this run's own, so the rule never places on a node left over from another run.
            cluster.add_agent(f"bench-conv-{suffix}-{index}", slots=args.slots, labels=f"bench={suffix}")
        cluster.wait_agents()
        names = [name for name, _ in cluster.agents]
        time.sleep(3)
        timings = []
        for run in range(args.runs):
            model = f"bench-conv-{suffix}-r{run}"
            models.append(model)
            model_config_upsert(name=model, backend="echo", options={"options": [f"load_ms:{args.load_ms}"]})
            SchedulingRule.objects.create(
                model_name=model, min_replicas=target, node_selector={"bench": str(suffix)}
            )
            started = time.perf_counter()
            report = reconcile_tick()
            elapsed = time.perf_counter() - started
            loaded = ModelReplica.objects.filter(model_name=model, state="loaded").count()
            nodes = ModelReplica.objects.filter(model_name=model).values("node").distinct().count()
            timings.append(elapsed)
            print(
                f"run {run + 1}: one tick placed {len(report.placed)}, {loaded}/{target} loaded on {nodes} nodes "
                f"in {elapsed * 1000:.0f} ms (loads of {args.load_ms} ms each; target <= {args.load_ms + 2000} ms)"
                + (f"; failed: {report.failed}" if report.failed else "")
            )
            # Free the slots for the next run: unload this model's replicas (not timed).
            SchedulingRule.objects.filter(model_name=model).delete()
            for replica in ModelReplica.objects.filter(model_name=model, node__name__in=names):
                replica_stop_on_node(node_id=replica.node_id, process_key=replica.process_key)
                replica.delete()
        print(f"median over {args.runs} runs: {statistics.median(timings) * 1000:.0f} ms")
    finally:
        cluster.stop()
        ModelConfig.objects.filter(name__in=models).delete()


if __name__ == "__main__":
    main()
