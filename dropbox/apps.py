from django.apps import AppConfig


class BccDropboxConfig(AppConfig):
    # The bare label "dropbox" would clash with the Dropbox SDK on PyPI.
    name = "dropbox"
    label = "bcc_dropbox"
    verbose_name = "BCC dropbox"
    default_auto_field = "django.db.models.BigAutoField"
