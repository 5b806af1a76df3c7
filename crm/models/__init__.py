"""CRM models: users, shared records (accounts, leads, contacts) and deals."""
from .deals import Deal, DealStage
from .organization import OrganizationEmail
from .records import Account, Contact, Lead, OwnedRecord, RecordShare
from .users import User

__all__ = [
    "Account",
    "Contact",
    "Deal",
    "DealStage",
    "Lead",
    "OrganizationEmail",
    "OwnedRecord",
    "RecordShare",
    "User",
]
