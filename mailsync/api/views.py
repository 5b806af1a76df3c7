"""Mailbox and email endpoints. Reads through ``mailsync.selectors``, writes through
``mailsync.services``."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db.models import Prefetch

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django_filters import rest_framework as filters
from django_filters.rest_framework import DjangoFilterBackend
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_variables
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.filters import SearchFilter
from rest_framework.request import Request
from rest_framework.response import Response

from crm.api.filters import QueryBooleanFilter, StableOrderingFilter, flag
from crm.api.pagination import KeysetPagination

from .. import selectors, services, tasks
from ..exceptions import MailServerUnreachable
from ..models import Attachment, Email, EmailLink, EmailLocation, Mailbox
from ..uploads import AttachmentsLimit
from ..views import INLINE_IMAGE_TYPES, attachment_download_response
from . import serializers as s


# The README's 409s of mailbox actions, in the schema too: a client generated from it was
# told only of 204 and 202 (found in review).
_CONFLICT = inline_serializer(name="MailboxConflict", fields={
    "detail": serializers.CharField(), "code": serializers.CharField(),
    "hint": serializers.CharField(required=False), "errors": serializers.DictField()})


class MailboxViewSet(viewsets.ModelViewSet):
    """The caller's mailboxes. Creating one first tests the login: nothing is saved if it
    fails, and the error says what to fix."""

    serializer_class = s.MailboxSerializer
    queryset = Mailbox.objects.none()

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return Mailbox.objects.none()
        return selectors.mailboxes_of(self.request.user).order_by("pk")

    @method_decorator(sensitive_variables())  # a DEBUG 500 page would show the password
    def perform_create(self, serializer) -> None:  # noqa: ANN001
        serializer.instance = services.mailbox_create(
            actor=self.request.user, data=serializer.validated_data
        )

    @method_decorator(sensitive_variables())
    def perform_update(self, serializer) -> None:  # noqa: ANN001
        serializer.instance = services.mailbox_update(
            actor=self.request.user, mailbox=serializer.instance, data=serializer.validated_data
        )

    @extend_schema(parameters=[OpenApiParameter(
        "delete_emails", bool, description="Required (true) when the mailbox holds mail: its "
        "synced and sent emails are removed from the CRM with it (never from the mail server). "
        "Without it such a mailbox is a 409 that says how many emails and how many on records.")],
        responses={204: None, 409: OpenApiResponse(_CONFLICT, description=(
            "code holds_mail: the mailbox holds mail and delete_emails was not true; "
            "busy: it is syncing now, repeat later."))})
    def destroy(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002, ANN003
        """Delete the mailbox. Not while it syncs (409)."""
        services.mailbox_delete(
            actor=request.user, mailbox=self.get_object(),
            delete_emails=flag(request.query_params, "delete_emails"))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=inline_serializer(
        "MailboxTest", {"ok": serializers.BooleanField(), "folders": serializers.ListField()}))
    @action(detail=True, methods=["post"])
    def test(self, request: Request, pk: str | None = None) -> Response:
        """Log in to the server now; 400 with what to fix if it fails."""
        folders = services.mailbox_test(mailbox=self.get_object())
        return Response({"ok": True, "folders": [name for name, _ in folders]})

    @extend_schema(request=None, responses=s.MailboxSerializer)
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str | None = None) -> Response:
        mailbox = services.mailbox_activate(actor=request.user, mailbox=self.get_object())
        return Response(s.MailboxSerializer(mailbox).data)

    @extend_schema(request=None, responses={202: s.MailboxStatusSerializer, 409: OpenApiResponse(
        _CONFLICT, description="code inactive: only the active mailbox syncs; activate it first.")})
    @action(detail=True, methods=["post"])
    def sync(self, request: Request, pk: str | None = None) -> Response:
        """Queue a sync now ("Sync now")."""
        mailbox = self.get_object()
        if not mailbox.is_active:
            return Response({"detail": "Activate this mailbox first: only the active mailbox syncs.",
                             "code": "inactive", "errors": {}}, status=status.HTTP_409_CONFLICT)
        tasks.sync_mailbox.delay(mailbox.pk)
        # The same shape as status/ (its serializer: the same date format, no extra key).
        return Response(s.MailboxStatusSerializer(selectors.mailbox_status(mailbox=mailbox)).data,
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses=inline_serializer(
        "MailboxRetry", {"refetched": serializers.IntegerField(), "reparsed": serializers.IntegerField(),
                         "refetch_paused_until": serializers.DateTimeField(
                             allow_null=True, help_text="Set when the provider's daily download "
                             "limit stopped the fetching again: Retry works again from then.")}))
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Retry the messages that failed to import and the bodies that failed to parse."""
        return Response(services.mailbox_retry_failed(actor=request.user, mailbox=self.get_object()))

    @extend_schema(responses=s.MailboxStatusSerializer)
    @action(detail=True, methods=["get"])
    def status(self, request: Request, pk: str | None = None) -> Response:
        return Response(s.MailboxStatusSerializer(selectors.mailbox_status(mailbox=self.get_object())).data)


class EmailFilter(filters.FilterSet):
    # Only records the user may see: else ?contact=<id> would tell which hidden contact a
    # visible mail belongs to, one id at a time (found in review).
    # One entry per message (the user's own copy first), as the record's page lists it.
    # Mail on a record only by a Bcc address is listed to the mailbox's owner only.
    lead = filters.NumberFilter(method="filter_record", help_text=(
        "Mail on this lead, each message once (your own copy where you have one); mail that "
        "had it only in Bcc, only if the mailbox is yours."))
    contact = filters.NumberFilter(method="filter_record", help_text=(
        "Mail on this contact, each message once (your own copy where you have one); mail "
        "that had it only in Bcc, only if the mailbox is yours."))
    deal = filters.NumberFilter(method="filter_record", help_text=(
        "Mail on this deal, each message once (your own copy where you have one); mail that "
        "had its contact only in Bcc, only if the mailbox is yours."))
    # Plain ids within the mail the user may see: a stranger's mailbox or conversation gives
    # the same empty page as an id that exists nowhere (a choice field told them apart).
    mailbox = filters.NumberFilter(field_name="mailbox")
    thread = filters.NumberFilter(field_name="thread")
    folder = filters.CharFilter(method="filter_folder", help_text=(
        "Mail with a copy in this folder (INBOX in any case); a copy marked \\Deleted on the "
        "server, not expunged yet, does not count."))
    date_after = filters.IsoDateTimeFilter(field_name="date", lookup_expr="gte")
    date_before = filters.IsoDateTimeFilter(field_name="date", lookup_expr="lt")
    unread = QueryBooleanFilter(field_name="seen", exclude=True)
    flagged = QueryBooleanFilter(field_name="flagged")

    class Meta:
        model = Email
        fields = ["mailbox", "direction", "source", "flagged", "thread"]

    def filter_folder(self, queryset, name: str, value: str):  # noqa: ANN001, ANN201
        from ..sync.imap import wanted_folders

        # INBOX is case-insensitive (RFC 3501 5.1): stored as "INBOX", asked for as any case.
        # A copy there marked \Deleted (not expunged yet) does not count.
        (folder,) = wanted_folders([value])
        return selectors.emails_in_folder(emails=queryset, folder=folder)

    def filter_record(self, queryset, name: str, value: int):  # noqa: ANN001, ANN201
        from crm.models import Contact, Deal, Lead
        from crm.selectors import records_visible_to

        model = {"lead": Lead, "contact": Contact, "deal": Deal}[name]
        visible = records_visible_to(self.request.user, model.objects.filter(pk=value))
        # A Bcc-only link counts for the mailbox's owner only (selectors).
        return selectors.emails_linked_to(user=self.request.user, emails=queryset, field=name,
                                          records=visible.values("pk"))

    def filter_queryset(self, queryset):  # noqa: ANN001, ANN201
        """A record's mail lists each message once, as the record's page does: the same
        mail in two mailboxes (two colleagues' public ones, or two of the user's own) was
        listed twice (found in review). Applied after the other filters, so ``mailbox=``
        with a record still finds that mailbox's copy. Without a record filter every copy
        is listed, as each mailbox's pages list them."""
        queryset = super().filter_queryset(queryset)
        if any(self.form.cleaned_data.get(name) is not None for name in ("lead", "contact", "deal")):
            queryset = selectors.emails_one_per_message(user=self.request.user, emails=queryset)
        return queryset


@contextmanager
def _on_the_mail_server() -> Iterator[None]:
    """Actions on mail already synced: the connection settings worked, so a server that
    cannot be reached now is an outage (502, retry later), not bad input (400, the status a
    wrong host or port gets when settings are entered)."""
    try:
        yield
    except MailServerUnreachable as exc:
        exc.http_status = 502
        raise


_MAIL_ERROR = inline_serializer(name="MailServerError", fields={
    "detail": serializers.CharField(), "code": serializers.CharField(), "hint": serializers.CharField()})
# What an action on the mail server may answer besides success (README, API).
_SERVER_ACTION_ERRORS = {
    409: OpenApiResponse(_MAIL_ERROR, description=(
        "Repeat later. code out_of_date: the mail or its folder changed on the server since "
        "the last sync (a sync has started); connection_busy: the mailbox's one connection "
        "besides IDLE stayed in use (a sync hands it over between batches) for "
        "MAILROOM_CONNECTION_WAIT seconds.")),
    502: OpenApiResponse(_MAIL_ERROR, description="The mail server could not be reached or failed."),
    503: OpenApiResponse(_MAIL_ERROR, description=(
        "code too_many_connections: the server refused a login, the account has too many "
        "connections open (other mail apps count too).")),
}


class AttachmentsLimitHandler(AttachmentsLimit):
    """The send endpoint's: a 400 at once, the rest of the request never read."""

    def over_limit(self) -> None:
        raise serializers.ValidationError({"attachments": [
            f"Attachments may total at most {self.limit // (1024 * 1024)} MB; these are larger."]})


_ATTACHMENT_CONTENT = OpenApiResponse(bytes, description=(
    "The file as a download (application/octet-stream, Content-Disposition: attachment), or "
    "with inline=1 a PNG, JPEG, GIF or WebP image with its own type (Content-Disposition: "
    "inline). Always X-Content-Type-Options: nosniff."))


class EmailViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                   viewsets.GenericViewSet):
    """Synced and sent emails you may see. PATCH and DELETE reach the IMAP server."""

    queryset = Email.objects.none()
    filterset_class = EmailFilter
    # The id breaks ties (also after ?ordering=date): paging over mail with equal dates.
    filter_backends = [DjangoFilterBackend, SearchFilter, StableOrderingFilter]
    search_fields = ["subject", "from_address", "from_name"]
    ordering_fields = ["date"]
    ordering = ["-date", "-id"]
    # Mail arrives while clients page: `next` carries a cursor (date, id), so following it
    # lists each email once; ?page=N pages as before (README, API).
    pagination_class = KeysetPagination

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return Email.objects.none()
        return selectors.emails_visible_to(self.request.user).prefetch_related(
            Prefetch("locations", EmailLocation.objects.select_related("folder")),
            "attachments", "links",
        )

    def get_serializer_class(self):  # noqa: ANN201
        if self.serializer_class is not None:  # an action's own (send): OPTIONS described
            return self.serializer_class       # the list's fields as what to POST to it
        return s.EmailDetailSerializer if self.action == "retrieve" else s.EmailListSerializer

    def initial(self, request: Request, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if self.action == "send":
            from .. import sending

            # Before anything reads the body (session authentication's CSRF check reads
            # the form), so the limit holds while the files arrive.
            request.upload_handlers.insert(
                0, AttachmentsLimitHandler(request._request, limit=sending.MAX_ATTACHMENTS_BYTES))
        super().initial(request, *args, **kwargs)

    def _reread(self, email: Email) -> Email:
        """The email as the answer shows it, read again after a change; a 404 (not a 500) if
        it was deleted meanwhile (another request, another tab)."""
        return get_object_or_404(self.get_queryset(), pk=email.pk)

    @extend_schema(
        parameters=[OpenApiParameter("images", bool, description="Show remote images (tracking pixels included).")]
    )
    def retrieve(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002, ANN003
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(request=s.EmailUpdateSerializer,
                   responses={200: s.EmailDetailSerializer, **_SERVER_ACTION_ERRORS})
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        """Mark read/unread, flag or move; done on the mail server, then in the CRM. A move
        into the Trash or Junk (never synced) takes the mail out of the CRM's views, as a
        delete does; the answer shows it there."""
        email = self.get_object()
        data = s.EmailUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        with _on_the_mail_server():
            email = services.email_update(actor=request.user, email=email, **data.validated_data)
        # Moved into the Trash or Junk, the mail left the CRM's views (as a delete): the
        # answer is what was done, not a 404 of the re-read.
        email = (Email.objects.prefetch_related(
            Prefetch("locations", EmailLocation.objects.select_related("folder")), "attachments", "links",
        ).get(pk=email.pk) if email.deleted_at else self._reread(email))
        return Response(s.EmailDetailSerializer(email, context={"request": request}).data)

    @extend_schema(responses={204: OpenApiResponse(
        description="Deleted. The header Mailroom-Delete-Outcome says what happened on the mail "
                    "server: trash (moved to its Trash), expunged (no Trash there, or it was in "
                    "the Trash: deleted for good) or crm (POP3 mail or mail not on the server: "
                    "the CRM only)."), **_SERVER_ACTION_ERRORS})
    def destroy(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002, ANN003
        email = self.get_object()
        with _on_the_mail_server():
            outcome = services.email_delete(actor=request.user, email=email)
        return Response(status=status.HTTP_204_NO_CONTENT, headers={"Mailroom-Delete-Outcome": outcome})

    @extend_schema(request={"application/json": s.EmailSendSerializer,
                            "multipart/form-data": s.EmailSendSerializer},
                   responses={202: s.EmailDetailSerializer},
                   parameters=[OpenApiParameter(
                       "Idempotency-Key", str, OpenApiParameter.HEADER, required=False,
                       description="Any unique string per message (at most 100 characters; a "
                                   "longer one is a 400): a request repeated with the same key "
                                   "(a retry after a timeout) returns the first one's email and "
                                   "sends nothing again. A key whose email was deleted since is "
                                   "a 400: use a new key.")])
    @action(detail=False, methods=["post"], url_path="send", serializer_class=s.EmailSendSerializer)
    def send(self, request: Request) -> Response:
        """Compose and send: stored on the record at once with ``send_state`` "sending",
        then "sent" or "failed" (with ``send_error``; retry with ``…/retry-send/``).
        With an ``Idempotency-Key`` header, a repeated request sends nothing twice."""
        from crm.models import Contact, Deal, Lead
        from crm.selectors import records_visible_to

        from .. import sending

        data = s.EmailSendSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        d = data.validated_data
        record = None
        for name, model in (("lead", Lead), ("contact", Contact), ("deal", Deal)):
            if d.get(name) is not None:
                record = records_visible_to(request.user, model.objects.filter(pk=d[name])).first()
                if record is None:
                    raise serializers.ValidationError({name: [f"No such {name} visible to you."]})
        parent = None
        if d.get("in_reply_to") is not None:
            parent = selectors.emails_visible_to(request.user).filter(pk=d["in_reply_to"]).first()
            if parent is None:
                raise serializers.ValidationError({"in_reply_to": ["No such email visible to you."]})
        email = sending.email_send(
            actor=request.user, from_address=d["from_address"], to=d["to"], cc=d["cc"],
            bcc=d["bcc"], subject=d["subject"], html=d["html"], text=d["text"], record=record,
            in_reply_to=parent, reply_to=d["reply_to"],
            attachments=[sending.OutgoingAttachment(f.name, f.content_type or "", f.read())
                         for f in d["attachments"]],
            token=request.headers.get("Idempotency-Key", ""),
        )
        email = self._reread(email)
        return Response(s.EmailDetailSerializer(email, context={"request": request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: s.EmailDetailSerializer})
    @action(detail=True, methods=["post"], url_path="retry-send")
    def retry_send(self, request: Request, pk: str | None = None) -> Response:
        """Send again a mail whose sending failed."""
        from .. import sending

        email = sending.email_send_retry(actor=request.user, email=self.get_object())
        email = self._reread(email)
        return Response(s.EmailDetailSerializer(email, context={"request": request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[OpenApiParameter("inline", bool, description=(
            "Show a PNG, JPEG, GIF or WebP image inline with its own type (the cid: images of "
            "the sanitized html link here with inline=1); any other file is still a download."))],
        responses={(200, media_type): _ATTACHMENT_CONTENT
                   for media_type in ("application/octet-stream", *sorted(INLINE_IMAGE_TYPES))})
    @action(detail=True, methods=["get"], url_path=r"attachments/(?P<attachment_id>\d+)")
    def attachment(self, request: Request, pk: str | None = None, attachment_id: str | None = None) -> HttpResponse:
        """Download an attachment: a download, never rendered by the browser, but for a
        safe image asked for ``inline`` (as the email page's attachment view)."""
        email = self.get_object()
        attachment = get_object_or_404(Attachment, pk=attachment_id, email=email)
        # Streamed when large: a web process stays under 200 MB (mailsync/views.py).
        return attachment_download_response(attachment, inline=flag(request.query_params, "inline"))


# Registered by crm/api/urls.py
ROUTES = [("mailboxes", MailboxViewSet, "mailbox"), ("emails", EmailViewSet, "email")]
__all__ = ["ROUTES", "EmailLink"]
