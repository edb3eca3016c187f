"""SQL checks of the placement invariants (QUALITY.md, "Concurrency"), shared by the tests and the bench."""

from __future__ import annotations

from dataclasses import dataclass, field

from nodes.models import ModelReplica, Node

_NODES = Node._meta.db_table
_REPLICAS = ModelReplica._meta.db_table

# One statement, so it sees one committed state: a placement commits its row and its reservation together.
OVERCOMMIT_SQL = f"""
SELECT n.name, n.available_vram, n.reserved_vram, COALESCE(SUM(r.vram_bytes), 0) AS held
FROM {_NODES} n LEFT JOIN {_REPLICAS} r ON r.node_id = n.id
WHERE n.total_vram > 0
GROUP BY n.id
HAVING n.reserved_vram < 0 OR COALESCE(SUM(r.vram_bytes), 0) > n.available_vram
"""

# Without heartbeats (in-process fake agents) every row still holds its reservation: the node's counter must
# equal the sum of its rows exactly, or a reservation was lost or released twice.
RESERVATION_DRIFT_SQL = f"""
SELECT n.name, n.reserved_vram, COALESCE(SUM(r.vram_bytes) FILTER (WHERE r.last_seen_at IS NULL), 0)
FROM {_NODES} n LEFT JOIN {_REPLICAS} r ON r.node_id = n.id
GROUP BY n.id
HAVING n.reserved_vram <> COALESCE(SUM(r.vram_bytes) FILTER (WHERE r.last_seen_at IS NULL), 0)
"""

DUPLICATE_SLOT_SQL = f"""
SELECT node_id, model_name, replica_index, COUNT(*) FROM {_REPLICAS}
GROUP BY node_id, model_name, replica_index HAVING COUNT(*) > 1
"""

OVER_CAP_SQL = f"""
SELECT n.name, r.model_name, COUNT(*) FROM {_REPLICAS} r JOIN {_NODES} n ON n.id = r.node_id
GROUP BY n.id, r.model_name
HAVING COUNT(*) > COALESCE(n.max_replicas_override, n.worker_max_replicas_per_model)
"""

IN_FLIGHT_SQL = f"SELECT COALESCE(SUM(in_flight), 0), COALESCE(MIN(in_flight), 0) FROM {_REPLICAS}"


@dataclass
class Violations:
    overcommits: list = field(default_factory=list)
    drift: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    over_cap: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.overcommits or self.drift or self.duplicates or self.over_cap)


def check(cursor, *, exact_reservations: bool = True) -> Violations:
    """The invariants as seen now through `cursor` (a DB-API cursor)."""
    found = Violations()
    for attribute, sql in (
        ("overcommits", OVERCOMMIT_SQL),
        ("duplicates", DUPLICATE_SLOT_SQL),
        ("over_cap", OVER_CAP_SQL),
        *((("drift", RESERVATION_DRIFT_SQL),) if exact_reservations else ()),
    ):
        cursor.execute(sql)
        getattr(found, attribute).extend(cursor.fetchall())
    return found
