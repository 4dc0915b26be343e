"""Delivery of blast batches: ``claims`` owns the rows (claim, lease, defer), ``sender``
the sending loop (re-check, throttle, render, SMTP, record)."""

from mailer.delivery.sender import Sender

__all__ = ["Sender"]
