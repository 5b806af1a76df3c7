"""Provider presets: server details, whether an app-specific password is needed, and the
daily download budget the provider enforces."""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    imap_host: str = ""
    imap_port: int = 993
    pop3_host: str = ""
    pop3_port: int = 995
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = "starttls"
    app_password_url: str = ""
    # Bytes a day the provider lets a mailbox download over IMAP/POP (None: no known cap).
    daily_download_bytes: int | None = None

    @property
    def needs_app_password(self) -> bool:
        return bool(self.app_password_url)


PRESETS: dict[str, Preset] = {p.key: p for p in [
    Preset("gmail", "Gmail", "imap.gmail.com", 993, "pop.gmail.com", 995, "smtp.gmail.com", 587,
           app_password_url="https://myaccount.google.com/apppasswords",
           daily_download_bytes=int(2.5 * GB)),
    Preset("yahoo", "Yahoo", "imap.mail.yahoo.com", 993, "pop.mail.yahoo.com", 995,
           "smtp.mail.yahoo.com", 465, "ssl",
           app_password_url="https://login.yahoo.com/account/security"),
    Preset("outlook", "Outlook/Hotmail", "outlook.office365.com", 993, "outlook.office365.com",
           995, "smtp-mail.outlook.com", 587,
           app_password_url="https://account.live.com/proofs/AppPassword"),
    Preset("zoho", "Zoho Mail", "imap.zoho.com", 993, "pop.zoho.com", 995, "smtp.zoho.com", 465,
           "ssl"),
    Preset("icloud", "iCloud", "imap.mail.me.com", 993, "", 995, "smtp.mail.me.com", 587,
           app_password_url="https://appleid.apple.com/account/manage"),
    Preset("aol", "AOL", "imap.aol.com", 993, "pop.aol.com", 995, "smtp.aol.com", 465, "ssl",
           app_password_url="https://login.aol.com/account/security"),
    Preset("fastmail", "Fastmail", "imap.fastmail.com", 993, "pop.fastmail.com", 995,
           "smtp.fastmail.com", 465, "ssl",
           app_password_url="https://app.fastmail.com/settings/security/integrations"),
    Preset("custom", "Other IMAP/POP3"),
]}


# Setup help text for Gmail over POP3 (the setup page shows it): what the CRM's download does
# to the Gmail copy is decided by a setting in Gmail, not by the CRM.
GMAIL_POP3_NOTE = (
    "Gmail's POP3 deletes or archives messages on retrieval according to your Gmail setting "
    "(Settings, Forwarding and POP/IMAP, \"When messages are accessed with POP\"), whatever "
    "you choose here."
)


def preset_for(key: str) -> Preset:
    return PRESETS.get(key, PRESETS["custom"])


def preset_servers(key: str, protocol: str) -> dict[str, object]:
    """The server details a preset gives a new mailbox of ``protocol`` ("imap" or "pop3"), as
    the setup page fills them in: empty for "custom", and no incoming server for a protocol
    the provider does not offer (iCloud has no POP3)."""
    preset = preset_for(key)
    if preset.key == "custom":
        return {}
    servers: dict[str, object] = {}
    host, port = ((preset.pop3_host, preset.pop3_port) if protocol == "pop3"
                  else (preset.imap_host, preset.imap_port))
    if host:
        servers.update(incoming_host=host, incoming_port=port, incoming_security="ssl")
    if preset.smtp_host:
        servers.update(smtp_host=preset.smtp_host, smtp_port=preset.smtp_port,
                       smtp_security=preset.smtp_security)
    return servers
