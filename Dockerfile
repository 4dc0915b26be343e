# syntax=docker/dockerfile:1
#
# mailer: one image for every role. The command picks the role:
#   mailer serve --host 0.0.0.0 --port 8000   (default: web)
#   mailer worker                              (arq worker; scale it out)
#   mailer migrate                             (Alembic upgrade head; run before new web/workers)
#
# Stage 1 builds a virtualenv at /opt/venv; stage 2 copies only that venv, the
# templates and worker.py. Every dependency ships manylinux wheels for CPython
# 3.11, so neither stage needs a compiler.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# uv installs exactly the versions in uv.lock (the same ones `make test` tested).
COPY uv.lock ./
RUN pip install "uv==$(sed -n '/^name = "uv"$/{n;s/version = "\(.*\)"/\1/p}' uv.lock)"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_COMPILE_BYTECODE=0 UV_LINK_MODE=copy

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the package itself (non-editable: the venv is all the final stage gets).
COPY mailer ./mailer
RUN uv sync --frozen --no-dev --no-editable \
    && python -c "import mailer.config, mailer.migrate"


FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MAILER_TEMPLATES_DIR=/app/templates \
    MAILER_ENV=production

RUN groupadd --system --gid 10001 mailer \
    && useradd --system --uid 10001 --gid mailer --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin mailer

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# worker.py sits in the working directory so `arq worker.WorkerSettings` and
# `arq --check worker.WorkerSettings` (the compose worker healthcheck) find it.
COPY templates ./templates
COPY worker.py ./
# The only writable place for the app user: mount a volume here if you run the
# image on SQLite (MAILER_DATABASE_URL=sqlite+aiosqlite:////app/data/mailer.db).
RUN mkdir -p /app/data && chown mailer:mailer /app/data

USER 10001:10001
EXPOSE 8000
CMD ["mailer", "serve", "--host", "0.0.0.0", "--port", "8000"]
