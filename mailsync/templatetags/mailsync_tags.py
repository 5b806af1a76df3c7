"""``{% record_emails record %}``: the Emails related list on lead, contact and deal pages."""
from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.inclusion_tag("mailsync/_record_emails.html", takes_context=True)
def record_emails(context: template.Context, record: Any) -> dict[str, Any]:
    from ..views import record_emails_context

    return record_emails_context(context["request"], record)


@register.filter
def send_badge(email: Any) -> str:
    """CSS modifier of the send-state badge."""
    return {"sending": "pending", "sent": "ok", "failed": "bad"}.get(email.send_state, "")


@register.filter
def record_kind(record: Any) -> str:
    return record._meta.verbose_name.capitalize()
