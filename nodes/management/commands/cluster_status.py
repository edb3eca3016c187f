"""`python manage.py cluster_status`: nodes (status, slots, VRAM used/reserved/total) and replicas, as tables."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.management.base import BaseCommand

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

    def handle(self, *args, **options) -> None:
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
