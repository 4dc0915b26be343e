"""Provider webhooks: each module checks its provider's signature and maps the payload.

- ``sns.py``: Amazon SNS message signatures (the envelope SES notifications come in);
- ``ses.py``, ``postmark.py``, ``sendgrid.py``, ``mailgun.py``: one provider each,
  verification first, then its events mapped to :class:`~.common.Reported`;
- ``common.py``: what they share: the refusal, the mapped event, the fingerprint,
  and :func:`~.common.deliver`, which identifies and hands events to ``ingest.apply_event``.

The routes are in ``mailer/web/webhooks.py``; set-up per provider in docs/deploy.md.
"""
