"""REST endpoints. Each viewset reads through ``crm.selectors`` and writes through
``crm.services``; serializers only shape and validate input."""
from __future__ import annotations

from django.contrib.contenttypes.models import ContentType
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from .. import services
from ..models import Account, Contact, Deal, DealStage, Lead, OwnedRecord, RecordShare, User
from ..selectors import SEARCH_FIELDS, records_visible_to
from . import serializers as s


class IsAdministratorOrReadOnly(permissions.BasePermission):
    def has_permission(self, request: Request, view: object) -> bool:
        return request.method in permissions.SAFE_METHODS or bool(
            request.user and request.user.is_administrator
        )


class UserViewSet(viewsets.ReadOnlyModelViewSet):
    """Users of this CRM (read-only here; administrators manage them in the admin console)."""

    serializer_class = s.UserSerializer
    filterset_fields = ["role", "is_active", "manager"]
    search_fields = ["username", "first_name", "last_name", "email"]
    ordering_fields = ["username", "last_name"]

    queryset = User.objects.none()  # for the schema; requests use get_queryset

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return User.objects.none()
        users = User.objects.all()
        return users if self.request.user.is_administrator else users.filter(is_active=True)


class DealStageViewSet(viewsets.ModelViewSet):
    """Pipeline stages; everyone reads them, administrators change them."""

    serializer_class = s.DealStageSerializer
    queryset = DealStage.objects.all()
    permission_classes = [permissions.IsAuthenticated, IsAdministratorOrReadOnly]
    pagination_class = None


class _RecordViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    model: type[OwnedRecord]
    ordering_fields = ["modified_at", "created_at"]
    ordering = ["-modified_at"]

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return self.model.objects.none()
        return records_visible_to(self.request.user, self.model.objects.select_related("owner"))

    def perform_create(self, serializer) -> None:  # noqa: ANN001
        serializer.instance = services.record_create(
            actor=self.request.user, model=self.model, data=serializer.validated_data
        )

    def perform_update(self, serializer) -> None:  # noqa: ANN001
        serializer.instance = services.record_update(
            actor=self.request.user, record=serializer.instance, data=serializer.validated_data
        )

    def perform_destroy(self, instance: OwnedRecord) -> None:
        services.record_delete(actor=self.request.user, record=instance)

    @extend_schema(request=s.ShareInputSerializer, responses=s.ShareSerializer(many=True))
    @action(detail=True, methods=["get", "post"])
    def shares(self, request: Request, pk: str | None = None) -> Response:
        """List who a record is shared with, or share it with one more user."""
        record = self.get_object()
        if request.method == "POST":
            data = s.ShareInputSerializer(data=request.data)
            data.is_valid(raise_exception=True)
            services.record_share(actor=request.user, record=record, **data.validated_data)
        shares = RecordShare.objects.filter(
            content_type=ContentType.objects.get_for_model(record), object_id=record.pk
        )
        return Response(
            s.ShareSerializer(shares, many=True).data,
            status=status.HTTP_201_CREATED if request.method == "POST" else status.HTTP_200_OK,
        )


def _email_filters(model: type[OwnedRecord]) -> type[filters.FilterSet]:
    class RecordFilter(filters.FilterSet):
        email = filters.CharFilter(method="filter_email", help_text="Primary or secondary email, case-insensitive.")
        modified_after = filters.IsoDateTimeFilter(field_name="modified_at", lookup_expr="gte")

        class Meta:
            fields = ["owner"] + [f for f in ("status", "account") if hasattr(model, f)]

        def filter_email(self, queryset, name, value):  # noqa: ANN001, ANN201, ARG002
            from django.db.models import Q

            return queryset.filter(Q(email__iexact=value) | Q(secondary_email__iexact=value))

    RecordFilter.Meta.model = model
    RecordFilter.__name__ = f"{model.__name__}Filter"
    return RecordFilter


class LeadViewSet(_RecordViewSet):
    model = Lead
    queryset = Lead.objects.none()
    serializer_class = s.LeadSerializer
    filterset_class = _email_filters(Lead)
    search_fields = list(SEARCH_FIELDS[Lead])


class ContactViewSet(_RecordViewSet):
    model = Contact
    queryset = Contact.objects.none()
    serializer_class = s.ContactSerializer
    filterset_class = _email_filters(Contact)
    search_fields = list(SEARCH_FIELDS[Contact])


class AccountViewSet(_RecordViewSet):
    model = Account
    queryset = Account.objects.none()
    serializer_class = s.AccountSerializer
    filterset_fields = ["owner"]
    search_fields = list(SEARCH_FIELDS[Account])


class DealViewSet(_RecordViewSet):
    model = Deal
    queryset = Deal.objects.none()
    serializer_class = s.DealSerializer
    filterset_fields = ["owner", "stage", "contact", "account"]
    search_fields = list(SEARCH_FIELDS[Deal])

    def get_queryset(self):  # noqa: ANN201
        return super().get_queryset().select_related("stage")
