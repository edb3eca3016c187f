# Claim rows go with their replica in PostgreSQL (ON DELETE CASCADE), not through Django's cascade, which
# deleted them before the replica row: the reverse of the router's lock order (see InFlightClaim.replica).

import django.db.models.deletion
from django.db import migrations, models


def _recreate(on_delete: str) -> str:
    return f"""
DO $$
DECLARE
  fk text;
BEGIN
  SELECT conname INTO STRICT fk FROM pg_constraint
  WHERE conrelid = 'nodes_inflightclaim'::regclass AND confrelid = 'nodes_modelreplica'::regclass
    AND contype = 'f';
  EXECUTE format('ALTER TABLE nodes_inflightclaim DROP CONSTRAINT %I', fk);
  EXECUTE format(
    'ALTER TABLE nodes_inflightclaim ADD CONSTRAINT %I FOREIGN KEY (replica_id) '
    'REFERENCES nodes_modelreplica (id) {on_delete} DEFERRABLE INITIALLY DEFERRED', fk
  );
END $$;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("nodes", "0006_replica_downloading_node_artifacts"),
    ]

    operations = [
        migrations.AlterField(
            model_name="inflightclaim",
            name="replica",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="claims",
                to="nodes.modelreplica",
            ),
        ),
        migrations.RunSQL(sql=_recreate("ON DELETE CASCADE"), reverse_sql=_recreate("")),
    ]
