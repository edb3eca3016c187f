"""Serializers of `GET /api/audit`."""

from __future__ import annotations

from rest_framework import serializers

from audit.models import Action, ActorKind, AuditEntry, Door
from nodes.api.admin_serializers import CleanCharField

TARGET_TYPES = ("node", "model", "rule", "api_key")


class AuditFilterSerializer(serializers.Serializer):
    """The query of `GET /api/audit` (and the audit page's filters): every filter optional."""

    actor = CleanCharField(
        required=False, max_length=255, help_text="The actor's name (user, key or command)."
    )
    action = serializers.ChoiceField(choices=Action.choices, required=False)
    target_type = serializers.ChoiceField(choices=[(t, t) for t in TARGET_TYPES], required=False)
    target_id = CleanCharField(required=False, max_length=255, help_text="The target's id or name.")
    since = serializers.DateTimeField(required=False, help_text="At or after this time.")
    until = serializers.DateTimeField(required=False, help_text="Before this time.")

    def validate(self, attrs: dict) -> dict:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"until": ["Must be after since."]})
        return attrs


class ActorSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=ActorKind.choices, source="actor_kind")
    name = serializers.CharField(source="actor_name")
    id = serializers.CharField(source="actor_id", help_text="The user's or API key's id ('' otherwise).")
    via = serializers.ChoiceField(
        choices=Door.choices, help_text="The door: api, page, admin, command, system."
    )


class TargetSerializer(serializers.Serializer):
    type = serializers.CharField(source="target_type")
    id = serializers.CharField(source="target_id")
    name = serializers.CharField(source="target_name")


class AuditEntrySerializer(serializers.ModelSerializer):
    actor = ActorSerializer(source="*")
    target = TargetSerializer(source="*")
    before = serializers.JSONField(
        allow_null=True, help_text="The target's state before (null: it did not exist)."
    )
    after = serializers.JSONField(allow_null=True, help_text="The target's state after (null: it is gone).")

    class Meta:
        model = AuditEntry
        fields = ("id", "at", "actor", "action", "target", "before", "after")
