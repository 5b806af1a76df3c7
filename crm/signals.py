"""Events other apps may react to. Sent by ``crm.services`` after the change, inside its
transaction (so a receiver's writes commit or roll back with it)."""
from django.dispatch import Signal

# Sent with ``record`` (a Lead, Contact, Account or Deal) and ``created`` (bool); on a change
# also ``previous``: the values before it of the fields given, by field name (foreign keys as
# ids).
record_saved = Signal()
