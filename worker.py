"""arq entry point: ``arq worker.WorkerSettings`` (``mailer worker`` does the same)."""

from mailer.config import get_settings
from mailer.worker import worker_settings

WorkerSettings = type("WorkerSettings", (), worker_settings(get_settings()))
