from __future__ import annotations

from django.db import models


class Order(models.Model):
    ref = models.CharField(max_length=20)
    shipped = models.BooleanField(default=False)


class Note(models.Model):
    """One row per run of ``shop.tasks.note``, in the order the runs happened."""

    label = models.CharField(max_length=50)
