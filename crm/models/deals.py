from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from .records import Account, Contact, OwnedRecord


class DealStage(models.Model):
    """A pipeline stage. ``probability`` (0-100) is the chance of winning a deal in it;
    0 marks a lost stage (the BCC dropbox skips deals in such stages)."""

    name = models.CharField(max_length=100, unique=True)
    probability = models.PositiveSmallIntegerField(
        validators=[MinValueValidator(0), MaxValueValidator(100)]
    )
    order = models.PositiveSmallIntegerField(default=0)
    is_closed = models.BooleanField(default=False)

    class Meta:
        ordering = ["order", "name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(probability__gte=0) & models.Q(probability__lte=100),
                name="deal_stage_probability_0_100",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.probability}%)"


class Deal(OwnedRecord):
    url_name = "deal"

    name = models.CharField(max_length=255)
    contact = models.ForeignKey(
        Contact, null=True, blank=True, on_delete=models.SET_NULL, related_name="deals"
    )
    account = models.ForeignKey(
        Account, null=True, blank=True, on_delete=models.SET_NULL, related_name="deals"
    )
    amount = models.DecimalField(max_digits=14, decimal_places=2, null=True, blank=True)
    stage = models.ForeignKey(DealStage, on_delete=models.PROTECT, related_name="deals")
    closing_date = models.DateField(null=True, blank=True)
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["-modified_at"]
        indexes = [models.Index(fields=["contact", "-modified_at"], name="deal_contact_recent")]

    def __str__(self) -> str:
        return self.name
