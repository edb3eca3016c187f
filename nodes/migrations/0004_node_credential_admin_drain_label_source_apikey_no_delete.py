"""Node identity and admin intent (issue 11): the agent's credential hash, the admin's drain flag, each
label's source, and a trigger that refuses to delete API keys (the gateway is open only while no key was
ever made, so a deleted key must not reopen it)."""

from django.db import migrations, models

AUTO_KEYS = ("node.replica-slots", "node.name", "gpu.vendor", "gpu.vram")


def mark_auto_labels(apps, schema_editor):
    # Existing labels cannot tell who set them: auto-label keys are the control plane's, the rest are taken
    # as an admin's (the safe side: a worker cannot overwrite them; an admin can remove them).
    apps.get_model("nodes", "NodeLabel").objects.filter(key__in=AUTO_KEYS).update(source="auto")


NO_DELETE_SQL = """
CREATE FUNCTION nodes_apikey_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'API keys cannot be deleted; revoke them instead' USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER nodes_apikey_refuse_delete BEFORE DELETE ON nodes_apikey
  FOR EACH ROW EXECUTE FUNCTION nodes_apikey_refuse_delete();
"""
DROP_NO_DELETE_SQL = """
DROP TRIGGER IF EXISTS nodes_apikey_refuse_delete ON nodes_apikey;
DROP FUNCTION IF EXISTS nodes_apikey_refuse_delete();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("nodes", "0003_node_token_hash_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="credential_hash",
            field=models.CharField(blank=True, default="", editable=False, max_length=64),
        ),
        migrations.AddField(
            model_name="node",
            name="drained_by_admin",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="nodelabel",
            name="source",
            field=models.CharField(
                choices=[("admin", "Admin"), ("worker", "Worker"), ("auto", "Control plane")],
                default="admin",
                max_length=8,
            ),
        ),
        migrations.RunPython(mark_auto_labels, migrations.RunPython.noop),
        migrations.RunSQL(NO_DELETE_SQL, DROP_NO_DELETE_SQL),
    ]
