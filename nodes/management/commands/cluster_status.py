"""`python manage.py cluster_status`: nodes (status, slots, VRAM used/reserved/total) and replicas, as tables.
`--why MODEL`: the placement dry run of `GET /api/plan` — every node's verdict for one more replica of MODEL."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.management.base import BaseCommand, CommandError

from nodes.api.admin import node_queryset
from nodes.models import ModelReplica


def human_bytes(n: int) -> str:
    if n <= 0:
        return "0"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
        for row in [headers, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Show the cluster: nodes (status, slots, VRAM used/reserved/total) and replicas."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--why",
            metavar="MODEL",
            help="Explain where one more replica of MODEL would go, node by node (a dry run: nothing is "
            "claimed or loaded).",
        )

    def handle(self, *args, **options) -> None:
        if options.get("why"):
            self.why(options["why"])
            return
        nodes = list(node_queryset())
        node_rows = []
        for node in nodes:
            slots = str(node.effective_max_replicas) + (" (override)" if node.max_replicas_override else "")
            used = max(node.total_vram - node.available_vram, 0)
            node_rows.append(
                [
                    node.name,
                    node.status + ("" if node.is_approved else " (unapproved)"),
                    node.node_type,
                    node.address or "-",
                    slots,
                    human_bytes(used),
                    human_bytes(node.reserved_vram),
                    human_bytes(node.total_vram),
                    str(node.model_count),
                    str(node.in_flight_count),
                ]
            )
        self.stdout.write(f"Nodes ({len(nodes)})")
        headers = [
            "NAME",
            "STATUS",
            "TYPE",
            "ADDRESS",
            "SLOTS",
            "VRAM USED",
            "RESERVED",
            "TOTAL",
            "REPLICAS",
            "IN-FLIGHT",
        ]
        self.stdout.write(table(headers, node_rows) if node_rows else "  (none)")

        replicas = list(
            ModelReplica.objects.select_related("node").order_by("model_name", "node__name", "replica_index")
        )
        replica_rows = [
            [
                replica.model_name,
                str(replica.replica_index),
                replica.node.name,
                replica.state,
                str(replica.in_flight),
                replica.address or "-",
                human_bytes(replica.vram_bytes),
                replica.last_used.strftime("%Y-%m-%d %H:%M:%S") if replica.last_used else "-",
            ]
            for replica in replicas
        ]
        self.stdout.write("")
        self.stdout.write(f"Replicas ({len(replicas)})")
        headers = ["MODEL", "INDEX", "NODE", "STATE", "IN-FLIGHT", "ADDRESS", "VRAM", "LAST USED"]
        self.stdout.write(table(headers, replica_rows) if replica_rows else "  (none)")

    def why(self, model_name: str) -> None:
        from scheduling.placement import UnknownModel
        from scheduling.services import placement_plan

        try:
            plan = placement_plan(model_name=model_name).as_dict()
        except UnknownModel as error:
            raise CommandError(str(error)) from None
        selector = ", ".join(f"{key}={value}" for key, value in plan["selector"].items()) or "-"
        self.stdout.write(
            f"Placing one more replica of {model_name} (needs {human_bytes(plan['vram_bytes'])}"
            f" VRAM, selector {selector})"
        )
        if plan["chosen"]:
            self.stdout.write(f"would go to: {plan['chosen']}")
        elif plan["evict"]:
            self.stdout.write(f"would evict {plan['evict']} on {plan['evict_node']}, then place there")
        else:
            self.stdout.write(plan["message"])
        rows = [[c["node"], c["verdict"], c["detail"]] for c in plan["candidates"]]
        self.stdout.write("")
        self.stdout.write(table(["NODE", "VERDICT", "DETAIL"], rows) if rows else "  (no backend node)")
