from __future__ import annotations

from rest_framework import serializers

from ..models import Account, Contact, Deal, DealStage, Lead, RecordShare, User


class UserSerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = [
            "id", "username", "first_name", "last_name", "email", "role", "is_active",
            "manager", "deactivated_at",
        ]
        read_only_fields = fields


class DealStageSerializer(serializers.ModelSerializer):
    class Meta:
        model = DealStage
        fields = ["id", "name", "probability", "order", "is_closed"]


_RECORD_META = ["id", "owner", "created_at", "modified_at"]


def reject_unknown_fields(serializer: serializers.Serializer) -> None:
    """A name the resource does not have ({"last_nmae": ...}) is a 400, not a 200 that
    changed nothing. Read-only fields are known (a GET body sent back is fine); the
    browsable API's form posts its CSRF token among the fields."""
    given = serializer.initial_data if hasattr(serializer.initial_data, "keys") else {}
    unknown = sorted(str(name) for name in given.keys()
                     if name not in serializer.fields and name != "csrfmiddlewaretoken")
    if unknown:
        raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})


class _RecordSerializer(serializers.ModelSerializer):
    """Owner is optional on create (defaults to the caller); services check who may own."""

    owner = serializers.PrimaryKeyRelatedField(
        queryset=User.objects.all(), required=False, allow_null=True
    )

    def validate(self, attrs: dict) -> dict:
        reject_unknown_fields(self)
        return attrs


class LeadSerializer(_RecordSerializer):
    class Meta:
        model = Lead
        fields = [
            *_RECORD_META, "first_name", "last_name", "company", "title", "email",
            "secondary_email", "phone", "mobile", "status", "source", "description",
        ]
        read_only_fields = ["id", "created_at", "modified_at"]


class ContactSerializer(_RecordSerializer):
    class Meta:
        model = Contact
        fields = [
            *_RECORD_META, "first_name", "last_name", "account", "title", "email",
            "secondary_email", "phone", "mobile", "description",
        ]
        read_only_fields = ["id", "created_at", "modified_at"]


class AccountSerializer(_RecordSerializer):
    class Meta:
        model = Account
        fields = [*_RECORD_META, "name", "website", "phone", "industry", "description"]
        read_only_fields = ["id", "created_at", "modified_at"]


class DealSerializer(_RecordSerializer):
    probability = serializers.IntegerField(source="stage.probability", read_only=True)

    class Meta:
        model = Deal
        fields = [
            *_RECORD_META, "name", "contact", "account", "amount", "stage", "probability",
            "closing_date", "description",
        ]
        read_only_fields = ["id", "created_at", "modified_at", "probability"]


class ShareInputSerializer(serializers.Serializer):
    user = serializers.PrimaryKeyRelatedField(queryset=User.objects.all())
    access = serializers.ChoiceField(choices=RecordShare.Access.choices, default="read")


class ShareSerializer(serializers.ModelSerializer):
    class Meta:
        model = RecordShare
        fields = ["user", "access", "shared_by", "created_at"]
        read_only_fields = fields
