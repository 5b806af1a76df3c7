"""URLs of the email pages (included at the site root by ``crm.urls``)."""
from django.urls import path

from . import views

urlpatterns = [
    # Setup › Channels › Email
    path("setup/email/", views.config_view, name="mail-config"),
    path("setup/email/new/", views.mailbox_add_view, name="mail-mailbox-add"),
    path("setup/email/<int:pk>/", views.mailbox_detail_view, name="mail-mailbox"),
    path("setup/email/<int:pk>/connection/", views.mailbox_edit_view, name="mail-mailbox-edit"),
    path("setup/email/<int:pk>/status/", views.mailbox_status_view, name="mail-mailbox-status"),
    path("setup/email/<int:pk>/sync/", views.mailbox_sync_view, name="mail-mailbox-sync"),
    path("setup/email/<int:pk>/retry/", views.mailbox_retry_view, name="mail-mailbox-retry"),
    path("setup/email/<int:pk>/activate/", views.mailbox_activate_view, name="mail-mailbox-activate"),
    path("setup/email/<int:pk>/delete/", views.mailbox_delete_view, name="mail-mailbox-delete"),
    path("setup/email/<int:pk>/folders/", views.mailbox_folders_view, name="mail-mailbox-folders"),
    path("setup/email/<int:pk>/aliases/", views.alias_add_view, name="mail-alias-add"),
    path("setup/email/<int:pk>/aliases/<int:alias_id>/delete/", views.alias_delete_view,
         name="mail-alias-delete"),
    path("setup/email/organization/", views.org_emails_view, name="mail-org-emails"),
    path("setup/email/organization/<int:pk>/resend/", views.org_email_resend_view,
         name="mail-org-resend"),
    path("setup/email/organization/<int:pk>/delete/", views.org_email_delete_view,
         name="mail-org-delete"),
    path("confirm-email/<str:token>/", views.org_email_verify_view, name="mail-org-verify"),
    # Mail
    path("mail/", views.inbox_view, name="mail-inbox"),
    path("mail/compose/", views.compose_view, name="mail-compose"),
    path("mail/<int:pk>/", views.email_detail_view, name="mail-email"),
    path("mail/<int:pk>/body/", views.email_body_view, name="mail-email-body"),
    path("mail/<int:pk>/actions/", views.email_action_view, name="mail-email-action"),
    path("mail/<int:pk>/opened/", views.email_opened_view, name="mail-email-opened"),
    path("mail/<int:pk>/move-folders/", views.email_move_folders_view, name="mail-email-move-folders"),
    path("mail/<int:pk>/add-record/", views.add_record_from_email_view, name="mail-add-record"),
    path("mail/<int:pk>/attachments/<int:attachment_id>/", views.email_attachment_view,
         name="mail-attachment"),
    path("mail/records/<str:kind>/<int:pk>/", views.record_emails_view, name="mail-record-emails"),
]
