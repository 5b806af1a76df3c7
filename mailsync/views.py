"""Email pages: Setup › Channels › Email (mailboxes, options, organization emails), the
sync status panel, the Emails related list of records, the email view, the mailbox view of
unmatched mail, and compose/reply.

Views translate HTTP into calls of ``mailsync.services``, ``mailsync.sending``,
``mailsync.senders`` and the selectors; they hold no business rules.
"""
from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Retry
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.files.uploadhandler import StopUpload
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import content_disposition_header, url_has_allowed_host_and_scheme
from django.views.decorators.clickjacking import xframe_options_sameorigin
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from django.views.decorators.http import require_http_methods, require_POST

from crm import services as crm_services
from crm.models import Account, Contact, Deal, Lead, OrganizationEmail
from crm.selectors import records_visible_to

from . import selectors, senders, sending, services, tasks
from .exceptions import MailboxBusy, MailboxHoldsMail, MailError
from .uploads import AttachmentsLimit
from .forms import (
    PROVIDER_CHOICES,
    AliasForm,
    ComposeForm,
    MailboxForm,
    MailboxOptionsForm,
    OrganizationEmailForm,
    preset_initial,
    provider_preset,
)
from .models import Attachment, Email, MailboxAlias, MailFolder, Mailbox
from .providers import PRESETS
from .storage import decompress, decompressed_chunks

log = logging.getLogger(__name__)

RECORD_MODELS: dict[str, type[Lead] | type[Contact] | type[Deal]] = {
    "lead": Lead, "contact": Contact, "deal": Deal,
}
THREADS_PER_PAGE = 10
INBOX_PAGE = 50


def _is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def _back(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return default


def _own_mailbox(request: HttpRequest, pk: int) -> Mailbox:
    return get_object_or_404(selectors.mailboxes_of(request.user), pk=pk)


def explain(exc: MailError) -> str:
    """A mail error in plain words, with the fix. Provider messages that say IMAP or POP
    access is turned off become that advice."""
    cause = str(exc.__cause__ or "").lower()
    if any(word in cause for word in ("disabled", "not enabled", "turned off", "web login required")):
        return (f"{exc.message} The provider says access over IMAP/POP is turned off for this "
                "account: turn it on in the provider's mail settings (Gmail: Settings › "
                "Forwarding and POP/IMAP), then save again.")
    return str(exc)


# -- Setup › Channels › Email › Email Configuration -----------------------------------------

@login_required
def config_view(request: HttpRequest) -> HttpResponse:
    mailboxes = list(selectors.mailboxes_of(request.user).order_by("-is_active", "pk"))
    return render(request, "mailsync/config.html", {
        "mailboxes": mailboxes, "providers": PROVIDER_CHOICES, "presets": PRESETS,
    })


def _provider_context(form: MailboxForm, choice: str) -> dict[str, Any]:
    preset, fixed = provider_preset(choice)
    return {
        "form": form, "provider": choice, "preset": preset, "fixed_protocol": fixed,
        "providers": PROVIDER_CHOICES, "presets": PRESETS,
        "preset_data": {key: preset_initial(key) | {"pop3": preset_initial(key, "pop3")}
                        for key, _ in PROVIDER_CHOICES},
        "open_details": preset.key == "custom" or bool(form.errors.keys() & {
            "incoming_host", "incoming_port", "incoming_security", "username", "smtp_host",
            "smtp_port", "smtp_security", "smtp_username", "smtp_password"}),
    }


@sensitive_post_parameters("password", "smtp_password")
@sensitive_variables()
@login_required
@require_http_methods(["GET", "POST"])
def mailbox_add_view(request: HttpRequest) -> HttpResponse:
    choice = request.POST.get("provider") or request.GET.get("provider") or ""
    if choice not in dict(PROVIDER_CHOICES):
        return render(request, "mailsync/provider_pick.html", {
            "providers": PROVIDER_CHOICES, "presets": PRESETS,
        })
    form = MailboxForm(request.POST or None,
                       initial=preset_initial(choice, request.GET.get("protocol")))
    connection_error = ""
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                mailbox = services.mailbox_create(actor=request.user, data=form.mailbox_data())
                for address in form.cleaned_data["aliases"]:
                    senders.mailbox_alias_add(actor=request.user, mailbox=mailbox, address=address)
        except MailError as exc:
            connection_error = explain(exc)
        except ValidationError as exc:
            _form_errors(form, exc)
        else:
            messages.success(request, f"Connected {mailbox.email_address}. "
                             + ("The first sync has started." if mailbox.is_active else
                                "Activate it to start syncing."))
            return redirect("mail-mailbox", pk=mailbox.pk)
    return render(request, "mailsync/mailbox_form.html",
                  _provider_context(form, choice) | {"connection_error": connection_error})


def _form_errors(form: Any, exc: ValidationError) -> None:
    if hasattr(exc, "error_dict"):
        for name, errors in exc.message_dict.items():
            form.add_error(name if name in form.fields else None, errors)
    else:
        form.add_error(None, exc.messages)


@sensitive_post_parameters("password", "smtp_password")
@sensitive_variables()
@login_required
@require_http_methods(["GET", "POST"])
def mailbox_edit_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    choice = {"custom": f"other-{mailbox.protocol}"}.get(mailbox.provider, mailbox.provider)
    initial = {name: getattr(mailbox, name) for name in (
        "protocol", "display_name", "email_address", "incoming_host", "incoming_port",
        "incoming_security", "username", "smtp_host", "smtp_port", "smtp_security",
        "smtp_username")} | {"provider": choice}
    form = MailboxForm(request.POST or None, initial=initial, editing=mailbox)
    connection_error = ""
    if request.method == "POST" and form.is_valid():
        data = form.mailbox_data()
        changed = {k: v for k, v in data.items()
                   if k in {"password", "smtp_password"} and v or
                   k not in {"password", "smtp_password"} and v != getattr(mailbox, k)}
        try:
            services.mailbox_update(actor=request.user, mailbox=mailbox, data=changed)
        except MailError as exc:
            connection_error = explain(exc)
            mailbox.refresh_from_db()
        except ValidationError as exc:
            _form_errors(form, exc)
            mailbox.refresh_from_db()
        else:
            messages.success(request, "Connection settings saved." if changed else "Nothing changed.")
            return redirect("mail-mailbox", pk=mailbox.pk)
    return render(request, "mailsync/mailbox_form.html",
                  _provider_context(form, choice) | {"mailbox": mailbox,
                                                     "connection_error": connection_error})


@login_required
@require_http_methods(["GET", "POST"])
def mailbox_detail_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    form = MailboxOptionsForm(request.POST or None, mailbox=mailbox)
    if request.method == "POST" and form.is_valid():
        try:
            services.mailbox_update(actor=request.user, mailbox=mailbox, data=form.options_data())
        except ValidationError as exc:
            _form_errors(form, exc)
        else:
            messages.success(request, "Options saved.")
            return redirect("mail-mailbox", pk=mailbox.pk)
    return _mailbox_page(request, mailbox, form=form, alias_form=AliasForm())


def _mailbox_page(request: HttpRequest, mailbox: Mailbox, *, form: MailboxOptionsForm,
                  alias_form: AliasForm) -> HttpResponse:
    return render(request, "mailsync/mailbox_detail.html", {
        "mailbox": mailbox, "form": form, "alias_form": alias_form,
        "aliases": mailbox.aliases.order_by("address"),
        "status": selectors.mailbox_status(mailbox=mailbox),
        "holdings": selectors.mailbox_holdings(mailbox=mailbox),
    })


@login_required
@require_POST
def mailbox_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete a mailbox; one that holds mail only when the owner ticked "delete its emails
    too" (the mail stays on the server either way)."""
    mailbox = _own_mailbox(request, pk)
    address = mailbox.email_address
    try:
        removed = services.mailbox_delete(actor=request.user, mailbox=mailbox,
                                          delete_emails=request.POST.get("delete_emails") == "1")
    except MailboxHoldsMail as exc:
        messages.error(request, str(exc).replace("Repeat with delete_emails=true to delete them too",
                                                 "Tick “Also delete its emails” to delete them too"))
        return redirect("mail-mailbox", pk=pk)
    except MailboxBusy:
        messages.error(request, f"{address} is syncing right now: try again in a minute.")
        return redirect("mail-mailbox", pk=pk)
    removed_text = f" and its {removed} email{'' if removed == 1 else 's'}" if removed else ""
    messages.success(request, f"Mailbox {address}{removed_text} deleted from the CRM; nothing "
                              "changed on the mail server.")
    return redirect("mail-config")


@login_required
def mailbox_status_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The live status panel (polled by htmx)."""
    mailbox = _own_mailbox(request, pk)
    return render(request, "mailsync/_status.html", {
        "mailbox": mailbox, "status": selectors.mailbox_status(mailbox=mailbox),
    })


@login_required
@require_POST
def mailbox_sync_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    if not mailbox.is_active:
        messages.error(request, "Activate this mailbox first: only the active mailbox syncs.")
    else:
        try:
            tasks.sync_mailbox.delay(mailbox.pk)
        except MailError as exc:  # eager mode (tests) raises here; a worker records it
            log.info("mailbox %s: sync now failed (%s)", mailbox.pk, exc.code)
    if _is_htmx(request):
        return mailbox_status_view(request, pk)
    return redirect("mail-mailbox", pk=mailbox.pk)


@login_required
@require_POST
def mailbox_retry_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    try:
        result = services.mailbox_retry_failed(actor=request.user, mailbox=mailbox)
        messages.success(request, f"Retried: {result['refetched']} message(s) fetched again, "
                                  f"{result['reparsed']} read again.")
        if result["refetch_paused_until"] is not None:
            until = timezone.localtime(result["refetch_paused_until"])
            messages.warning(request, "Your email provider's daily download limit is reached: the "
                                      "other messages can be fetched again from "
                                      f"{until:%Y-%m-%d %H:%M %Z}. Retry then.")
    except MailError as exc:
        messages.error(request, explain(exc))
    return redirect("mail-mailbox", pk=mailbox.pk)


@login_required
@require_POST
def mailbox_activate_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = services.mailbox_activate(actor=request.user, mailbox=_own_mailbox(request, pk))
    messages.success(request, f"{mailbox.email_address} is now the active mailbox; "
                              "the others stopped syncing.")
    return redirect(_back(request, reverse("mail-config")))


@login_required
def mailbox_folders_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The folders on the server, as a hint next to "Folders to sync" (loaded on demand)."""
    mailbox = _own_mailbox(request, pk)
    names, error = _server_folders(mailbox)
    return render(request, "mailsync/_folders.html", {"names": names, "error": error})


def _folders_key(mailbox: Mailbox) -> str:
    return f"mailsync:folders:{mailbox.pk}:{mailbox.modified_at.timestamp()}"


def _cached_server_folders(mailbox: Mailbox) -> list[str] | None:
    """The server's folders if listed in the last 10 minutes, without asking the server."""
    return cache.get(_folders_key(mailbox))


def _server_folders(mailbox: Mailbox) -> tuple[list[str], str]:
    known = list(MailFolder.objects.filter(mailbox=mailbox).order_by("name")
                 .values_list("name", flat=True))
    if mailbox.protocol != Mailbox.Protocol.IMAP:
        return known, ""
    key = _folders_key(mailbox)
    names = cache.get(key)
    if names is None:
        from .protocols.imap import ImapSession
        from .sync.imap import server_settings

        from .sync.lock import connection_slot

        try:
            with connection_slot(mailbox.pk, wait=5), \
                    ImapSession(server_settings(mailbox, timeout=10)) as session:
                names = [name for name, _ in session.list_folders()]
        except MailError as exc:
            return known, str(exc)
        cache.set(key, names, 600)
    return names, ""


@login_required
@require_POST
def alias_add_view(request: HttpRequest, pk: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    form = AliasForm(request.POST)
    if form.is_valid():
        try:
            senders.mailbox_alias_add(actor=request.user, mailbox=mailbox, **form.cleaned_data)
            messages.success(request, f"Added {form.cleaned_data['address']}.")
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
    else:
        # Shown again with what was typed (a redirect emptied the field, so the user could
        # not see what was wrong with it).
        messages.error(request, f"Not an email address: {request.POST.get('address', '')[:200]}")
        return _mailbox_page(request, mailbox, form=MailboxOptionsForm(mailbox=mailbox),
                             alias_form=form)
    return redirect(reverse("mail-mailbox", args=[mailbox.pk]) + "#aliases")


@login_required
@require_POST
def alias_delete_view(request: HttpRequest, pk: int, alias_id: int) -> HttpResponse:
    mailbox = _own_mailbox(request, pk)
    alias = get_object_or_404(MailboxAlias, pk=alias_id, mailbox=mailbox)
    senders.mailbox_alias_delete(actor=request.user, alias=alias)
    messages.success(request, f"Removed {alias.address}.")
    return redirect(reverse("mail-mailbox", args=[mailbox.pk]) + "#aliases")


# -- Organization emails --------------------------------------------------------------------

def _require_admin(request: HttpRequest) -> None:
    if not request.user.is_administrator:
        raise PermissionDenied("Only administrators manage organization emails.")


def _verify_link(request: HttpRequest):  # noqa: ANN202
    return lambda token: request.build_absolute_uri(reverse("mail-org-verify", args=[token]))


@login_required
@require_http_methods(["GET", "POST"])
def org_emails_view(request: HttpRequest) -> HttpResponse:
    _require_admin(request)
    form = OrganizationEmailForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            org = senders.organization_email_add(actor=request.user, link_for=_verify_link(request),
                                                 **form.cleaned_data)
        except ValidationError as exc:
            _form_errors(form, exc)
        else:
            messages.success(request, f"A confirmation link was sent to {org.address}. "
                                      "The address can be used once it is confirmed.")
            return redirect("mail-org-emails")
    rows = [(org, senders.verification_mail(org)) for org in OrganizationEmail.objects.all()]
    return render(request, "mailsync/org_emails.html", {"form": form, "rows": rows})


@login_required
@require_POST
def org_email_resend_view(request: HttpRequest, pk: int) -> HttpResponse:
    _require_admin(request)
    org = get_object_or_404(OrganizationEmail, pk=pk)
    try:
        senders.organization_email_send_confirmation(actor=request.user, org_email=org,
                                                     link_for=_verify_link(request))
        messages.success(request, f"A new confirmation link was sent to {org.address}.")
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    return redirect("mail-org-emails")


@login_required
@require_POST
def org_email_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    _require_admin(request)
    org = get_object_or_404(OrganizationEmail, pk=pk)
    senders.organization_email_delete(actor=request.user, org_email=org)
    messages.success(request, f"Removed {org.address}.")
    return redirect("mail-org-emails")


@require_http_methods(["GET", "POST"])
def org_email_verify_view(request: HttpRequest, token: str) -> HttpResponse:
    """The confirmation link. GET only shows a button: link scanners of mail providers open
    links by themselves, and must not confirm an address on the owner's behalf."""
    org = senders.organization_email_by_token(token)
    done = None
    if request.method == "POST" and org is not None:
        try:
            done = senders.organization_email_verify(token=token)
        except ValidationError:  # used or expired a moment ago
            org = None
    return render(request, "mailsync/org_email_verify.html", {"org": org, "done": done},
                  status=200 if org or done else 404)


# -- Records: the Emails related list -------------------------------------------------------

def _record_or_404(request: HttpRequest, kind: str, pk: int) -> Lead | Contact | Deal:
    model = RECORD_MODELS.get(kind)
    if model is None:
        raise Http404("No such record type.")
    record = records_visible_to(request.user, model.objects.filter(pk=pk)).first()
    if record is None:
        raise Http404("No such record.")
    return record


def record_ref(record: Any) -> str:
    return f"{record._meta.model_name}:{record.pk}"


def _record_from_ref(request: HttpRequest, ref: str | None) -> Lead | Contact | Deal | None:
    if not ref or ":" not in ref:
        return None
    kind, _, pk = ref.partition(":")
    if not pk.isdigit():
        return None
    try:
        return _record_or_404(request, kind, int(pk))
    except Http404:
        return None


def record_emails_context(request: HttpRequest, record: Any) -> dict[str, Any]:
    """What the Emails section of a lead, contact or deal shows."""
    if isinstance(record, Account):
        return {"record": record, "unsupported": True}
    view = request.GET.get("emails_view", "all")
    if view not in selectors.EMAIL_VIEWS:
        view = "all"
    groups = selectors.record_email_groups(user=request.user, record=record, view=view)
    page = Paginator(groups, THREADS_PER_PAGE).get_page(request.GET.get("emails_page"))
    rows = list(page.object_list)
    keys = [row["group"] for row in rows]
    by_group: dict[int, list[Email]] = {}
    for email in selectors.emails_of_groups(user=request.user, record=record, view=view,
                                            groups=keys):
        by_group.setdefault(email.group, []).append(email)
    threads = [{"key": row["group"], "count": row["count"], "unread": row["unread"],
                "emails": by_group.get(row["group"], [])} for row in rows]
    return {
        "record": record, "ref": record_ref(record), "view": view, "threads": threads,
        "kind_name": record._meta.verbose_name,
        "page_obj": page, "views": [(key, label) for key, (label, _) in selectors.EMAIL_VIEWS.items()],
        "can_send": bool(senders.sender_choices(request.user)),
        "has_mailbox": selectors.mailboxes_of(request.user).exists(),
        "partial_url": reverse("mail-record-emails", args=[record._meta.model_name, record.pk]),
    }


@login_required
def record_emails_view(request: HttpRequest, kind: str, pk: int) -> HttpResponse:
    record = _record_or_404(request, kind, pk)
    # htmx swaps only the list: the view pick-list stays in place while the user uses it.
    template = "_record_emails_list.html" if _is_htmx(request) else "_record_emails.html"
    return render(request, f"mailsync/{template}", record_emails_context(request, record))


# -- One email ------------------------------------------------------------------------------

def _visible_email(request: HttpRequest, pk: int) -> Email:
    email = selectors.emails_visible_to(request.user).select_related("mailbox", "sent_by").filter(pk=pk).first()
    if email is None:
        raise Http404("No such email.")
    return email


def _linked_records(request: HttpRequest, email: Email) -> list[Any]:
    found: list[Any] = []
    links = list(email.links.select_related("lead", "contact", "deal"))
    for link in selectors.email_links_seen_by(user=request.user, email=email, links=links):
        record = link.lead or link.contact or link.deal
        if records_visible_to(request.user, type(record).objects.filter(pk=record.pk)).exists():
            found.append(record)
    return found


@login_required
def email_detail_view(request: HttpRequest, pk: int) -> HttpResponse:
    email = _visible_email(request, pk)
    record = _record_from_ref(request, request.GET.get("record"))
    is_owner = email.mailbox.owner_id == request.user.pk
    sanitized = None
    if email.html:
        from .mime import sanitize_html

        sanitized = sanitize_html(email.html)
    folders: list[str] = []
    folders_later = False
    if is_owner and email.mailbox.protocol == Mailbox.Protocol.IMAP:
        # Never a live LIST here: a slow or unreachable server must not hold up the page.
        # On a cold cache the Move list is loaded by the page (email_move_folders_view).
        cached = _cached_server_folders(email.mailbox)
        folders_later = cached is None
        # Meanwhile (and without JavaScript) the folders the sync knows are offered.
        folders = cached if cached is not None else list(
            MailFolder.objects.filter(mailbox=email.mailbox).order_by("name")
            .values_list("name", flat=True))
    current = selectors.email_folders(email.locations.select_related("folder"))
    # Opening an unread mail marks it read (email_opened_view, asked by the page once shown),
    # unless the owner marked it unread and is still on it (the page "Mark as unread"
    # returns to, a reload); opening another mail ends that.
    kept = request.session.get(_KEPT_UNREAD)
    if kept is not None and kept != email.pk:
        del request.session[_KEPT_UNREAD]
    return render(request, "mailsync/email_detail.html", {
        "email": email, "record": record, "ref": record_ref(record) if record else "",
        "records": _linked_records(request, email), "is_owner": is_owner,
        "attachments": email.attachments.filter(inline=False).order_by("pk"),
        "blocked_images": sanitized.blocked_remote_images if sanitized else 0,
        "participants": {role: list(email.participants.filter(role=role))
                         for role in ("to", "cc", "bcc", "reply_to")},
        "folders": [f for f in folders if f not in current], "current_folders": current,
        "folders_later": folders_later,
        "can_send": bool(senders.sender_choices(request.user)),
        "can_retry": email.send_state == Email.SendState.FAILED or sending.send_is_stuck(email),
        "images": request.GET.get("images") == "1",
        "mark_read_on_open": kept != email.pk and services.opening_marks_read(actor=request.user, email=email),
    })


_KEPT_UNREAD = "mailsync_kept_unread"


@login_required
@require_POST
def email_opened_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Asked by the email page of an unread mail once shown: it is marked read by a task
    (on the mail server first; a slow or unreachable server holds up no web request) and the
    page's read/flag buttons come back as they will be."""
    email = _visible_email(request, pk)
    if email.mailbox.owner_id != request.user.pk:
        raise Http404("No such email.")
    note = ""
    if services.opening_marks_read(actor=request.user, email=email):
        try:
            tasks.mark_opened_read.delay(email.pk, request.user.pk)
            email.seen = True  # shown as it will be; the task changes the row
        except Retry as retry:  # only when tasks run in the request (development, tests)
            failure = retry.exc if isinstance(retry.exc, MailError) else MailError(str(retry))
            note = f"Not marked as read in your mailbox: {explain(failure)}"
    return render(request, "mailsync/_read_buttons.html", {"email": email, "note": note})


@login_required
def email_move_folders_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The Move list of an email page, asked of the server after the page is shown."""
    email = _visible_email(request, pk)
    if email.mailbox.owner_id != request.user.pk or email.mailbox.protocol != Mailbox.Protocol.IMAP:
        raise Http404("No such email.")
    names, error = _server_folders(email.mailbox)
    current = {loc.folder.name for loc in email.locations.select_related("folder")}
    return render(request, "mailsync/_move_folders.html", {
        "folders": [f for f in names if f not in current], "error": error,
    })


@login_required
@xframe_options_sameorigin
def email_body_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The sanitized HTML body as its own document, for a sandboxed iframe. The CSP forbids
    scripts, forms and plugins and (unless the user asked) every remote resource."""
    from .mime import sanitize_html

    email = _visible_email(request, pk)
    allow = request.GET.get("images") == "1"
    cid_urls = {a.content_id.strip("<>"): reverse("mail-attachment", args=[email.pk, a.pk]) + "?inline=1"
                for a in email.attachments.all() if a.content_id}
    body = sanitize_html(email.html, allow_remote_images=allow, cid_urls=cid_urls).html
    response = render(request, "mailsync/email_body.html", {"body": body})
    images = "'self' data: https: http:" if allow else "'self' data:"
    response["Content-Security-Policy"] = (
        f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; font-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'; "
        "sandbox allow-same-origin allow-popups allow-popups-to-escape-sandbox")
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "private, no-store"
    return response


# Above this size an attachment is streamed as it is decompressed: read whole and sent as one
# HttpResponse, a 33 MB attachment took a web process to ~250-290 MB (its hex text from the
# SELECT, the compressed bytes, their copy, the content and the response's).
STREAM_ATTACHMENT_BYTES = 1 << 20


def attachment_content_response(attachment: Attachment, *, content_type: str) -> HttpResponse:
    """The attachment's content as the response body. Small ones as one HttpResponse; large
    ones from their compressed bytes read by binary COPY, decompressed a piece at a time."""
    from .sync.copy import read_blob  # noqa: PLC0415

    compressed = read_blob(attachment.blob_id)
    if compressed is None:
        raise Http404("No content for this attachment.")
    if attachment.size <= STREAM_ATTACHMENT_BYTES:
        return HttpResponse(decompress(compressed), content_type=content_type)
    response = StreamingHttpResponse(decompressed_chunks(compressed), content_type=content_type)
    response["Content-Length"] = str(attachment.size)
    return response


@login_required
def email_attachment_view(request: HttpRequest, pk: int, attachment_id: int) -> HttpResponse:
    """Attachments are always downloads, never rendered by the browser (``inline=1`` only
    for images referenced by ``cid:`` inside the sandboxed body)."""
    email = _visible_email(request, pk)
    attachment = get_object_or_404(Attachment, pk=attachment_id, email=email)
    return attachment_download_response(attachment, inline=request.GET.get("inline") == "1")


# Images a browser may show inline (a cid: image of a sanitized body): raster formats only,
# never SVG (it runs scripts) nor anything a browser would render as a document.
INLINE_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def attachment_download_response(attachment: Attachment, *, inline: bool) -> HttpResponse:
    """An attachment as a download; with ``inline`` and a safe image type, as that image
    (for the ``cid:`` images of the sandboxed body). Always ``nosniff`` and sandboxed, for
    the email pages and the API alike."""
    inline_image = inline and attachment.content_type in INLINE_IMAGE_TYPES
    response = attachment_content_response(
        attachment, content_type=attachment.content_type if inline_image else "application/octet-stream")
    response["Content-Disposition"] = content_disposition_header(not inline_image, attachment.filename)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


@login_required
@require_POST
def email_action_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Read/unread, flag, move, delete (done on the mail server first), and send again."""
    email = _visible_email(request, pk)
    action = request.POST.get("action", "")
    back = _back(request, reverse("mail-email", args=[email.pk]))
    try:
        if action in {"read", "unread"}:
            services.email_update(actor=request.user, email=email, seen=action == "read")
            messages.success(request, f"Marked as {action}.")
            if action == "unread":  # the page it goes back to must not mark it read again
                request.session[_KEPT_UNREAD] = email.pk
            else:
                request.session.pop(_KEPT_UNREAD, None)
        elif action in {"flag", "unflag"}:
            services.email_update(actor=request.user, email=email, flagged=action == "flag")
            messages.success(request, "Flagged." if action == "flag" else "Flag removed.")
        elif action == "move":
            folder = request.POST.get("folder", "").strip()
            email = services.email_update(actor=request.user, email=email, folder=folder)
            if email.deleted_at:  # the Trash or Junk: not synced, so no longer shown
                messages.success(request, f"Moved to {folder}. Mail there is not shown in the CRM.")
                return redirect("mail-inbox")
            messages.success(request, f"Moved to {folder}.")
        elif action == "delete":
            outcome = services.email_delete(actor=request.user, email=email)
            messages.success(request, {
                "trash": "Email deleted (moved to the Trash of the mailbox).",
                "expunged": "Email deleted, in the mailbox too (it has no Trash, or the mail "
                            "was in it already).",
                "crm": "Email deleted from the CRM (the mail server keeps its copy).",
            }[outcome])
            record = _record_from_ref(request, request.POST.get("record"))
            return redirect(record.get_absolute_url() + "#related-emails" if record else "mail-inbox")
        elif action == "retry":
            sending.email_send_retry(actor=request.user, email=email)
            email.refresh_from_db()
            if email.send_state == Email.SendState.FAILED:
                messages.error(request, f"Sending failed again: {email.send_error}")
            else:
                messages.success(request, "Sending again.")
        else:
            messages.error(request, "Unknown action.")
    except PermissionDenied as exc:
        messages.error(request, str(exc))
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except MailError as exc:
        messages.error(request, explain(exc))
    return redirect(back)


# -- The mailbox view: synced mail that matches no record -----------------------------------

@login_required
def inbox_view(request: HttpRequest) -> HttpResponse:
    mailboxes = list(selectors.mailboxes_of(request.user).order_by("-is_active", "pk"))
    chosen = None
    if request.GET.get("mailbox", "").isdigit():
        chosen = next((m for m in mailboxes if m.pk == int(request.GET["mailbox"])), None)
    emails = selectors.emails_unmatched(user=request.user, mailbox=chosen)
    page = Paginator(emails, INBOX_PAGE).get_page(request.GET.get("page"))
    return render(request, "mailsync/inbox.html", {
        "mailboxes": mailboxes, "chosen": chosen, "page_obj": page,
    })


def _other_party(email: Email) -> tuple[str, str]:
    """(name, address) of the person a mail is with: the sender of received mail, the
    first recipient of sent mail (To, then Cc, then Bcc); ("", "") if only the mailbox's
    own addresses are on it. Never the mailbox's own address or an alias: a note to self
    with the customers in Bcc, or a mail with only Cc, made a record of the salesperson,
    which never matches any mail (association.own_addresses)."""
    from .association import own_addresses

    own = own_addresses([email.mailbox_id]).get(email.mailbox_id, set())
    if email.direction == Email.Direction.SENT:
        people = [(a.get("name", ""), a.get("email", "")) for a in (*email.to, *email.cc)
                  if isinstance(a, dict)]
        people += list(email.participants.filter(role="bcc").order_by("pk").values_list("name", "address"))
    else:
        people = [(email.from_name, email.from_address)]
        people += list(email.participants.filter(role="reply_to").order_by("pk").values_list("name", "address"))
    return next(((name or "", address) for name, address in people
                 if address and address.strip().lower() not in own), ("", ""))


@login_required
@require_POST
def add_record_from_email_view(request: HttpRequest, pk: int) -> HttpResponse:
    """"Add as lead" / "Add as contact": the new record gets the person's past mail at once
    (``record_saved`` attaches it)."""
    email = get_object_or_404(Email, pk=pk, mailbox__owner=request.user, deleted_at__isnull=True)
    model = {"lead": Lead, "contact": Contact}.get(request.POST.get("kind", ""))
    if model is None:
        raise Http404("No such record type.")
    name, address = _other_party(email)
    if not address:
        messages.error(request, "This email has no one but you on it: there is no one to add.")
        return redirect("mail-inbox")
    first, _, last = name.strip().rpartition(" ")
    if not last:
        last = address.split("@")[0] or address
    data: dict[str, Any] = {"first_name": first[:100], "last_name": last[:100], "email": address}
    if model is Lead:
        data["source"] = "Email"
    try:
        record = crm_services.record_create(actor=request.user, model=model, data=data)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("mail-inbox")
    messages.success(request, f"{model._meta.verbose_name.capitalize()} “{record}” created with "
                              "their past emails.")
    return redirect(record.get_absolute_url() + "#related-emails")


# -- Compose and reply -----------------------------------------------------------------------

class _AttachmentsLimit(AttachmentsLimit):
    """The compose page's: the rest of the request is read and thrown away (into no file),
    and the page says the attachments are too large, with what was typed before them.
    (Django discards the rest by lines: data without line breaks passes through memory in
    one piece; a proxy's body limit, e.g. nginx client_max_body_size 25m, bounds that.)"""

    def over_limit(self) -> None:
        self.request.attachments_over_limit = True  # type: ignore[attr-defined]
        raise StopUpload(connection_reset=False)


@csrf_exempt  # the limit must be in place before anything reads the body: CSRF is checked below
@login_required
@require_http_methods(["GET", "POST"])
def compose_view(request: HttpRequest) -> HttpResponse:
    request.upload_handlers.insert(0, _AttachmentsLimit(request, limit=sending.MAX_ATTACHMENTS_BYTES))
    return _compose(request)


@csrf_protect
def _compose(request: HttpRequest) -> HttpResponse:
    record = _record_from_ref(request, request.POST.get("record") or request.GET.get("record"))
    parent = None
    reply_id = request.POST.get("reply") or request.GET.get("reply")
    if reply_id and reply_id.isdigit():
        parent = _visible_email(request, int(reply_id))
        if record is None:
            linked = _linked_records(request, parent)
            record = next((r for r in linked if not isinstance(r, Deal)), linked[0] if linked else None)
    choices = senders.sender_choices(request.user)
    initial: dict[str, Any] = {}
    if parent is not None:
        initial = sending.reply_defaults(email=parent, reply_all=request.GET.get("all") == "1")
        mine = {c.address.lower() for c in choices}
        addresses = [a["email"].lower() for a in parent.to + parent.cc]
        initial["from_address"] = next((a for a in addresses if a in mine), None) or (
            parent.mailbox.email_address if parent.mailbox.email_address.lower() in mine else None)
    elif record is not None and getattr(record, "email", ""):
        initial["to"] = record.email
    elif isinstance(record, Deal) and record.contact and record.contact.email:
        initial["to"] = record.contact.email
    form = ComposeForm(request.POST or None, request.FILES or None, senders=choices, initial=initial)
    if getattr(request, "attachments_over_limit", False):
        # Checked before is_valid(): the form without the files cut off would send the mail
        # without them.
        form.add_error("attachments", f"Attachments may total at most "
                                      f"{sending.MAX_ATTACHMENTS_BYTES // (1024 * 1024)} MB; "
                                      "nothing was sent. Attach fewer or smaller files.")
    elif request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            email = sending.email_send(
                actor=request.user, from_address=d["from_address"], to=d["to"], cc=d["cc"],
                bcc=d["bcc"], subject=d["subject"], html=d["html"], record=record,
                in_reply_to=parent, reply_to=d.get("reply_to") or "",
                attachments=[sending.OutgoingAttachment(f.name, f.content_type or "", f.read())
                             for f in d["attachments"]],
                token=d.get("token") or "",
            )
        except ValidationError as exc:
            _form_errors(form, exc)
        except MailError as exc:  # e.g. a line break hidden in an encoded word of the subject
            form.add_error(None, explain(exc))
        else:
            email.refresh_from_db()
            if email.send_state == Email.SendState.FAILED:
                messages.error(request, f"Sending failed: {email.send_error}")
            elif email.send_state == Email.SendState.SENT:
                messages.success(request, f"Email “{email.subject}” sent.")
            else:
                messages.success(request, f"Email “{email.subject}” is being sent.")
            if record is not None:
                return redirect(record.get_absolute_url() + "#related-emails")
            return redirect("mail-email", pk=email.pk)
    return render(request, "mailsync/compose.html", {
        "form": form, "record": record, "ref": record_ref(record) if record else "",
        "parent": parent, "has_senders": bool(choices),
        "max_mb": sending.MAX_ATTACHMENTS_BYTES // (1024 * 1024),
    })
