"""Time `mailer subscribers import` on 100k rows into a fresh SQLite database.

    .venv/bin/python bench/import_100k.py [--rows 100000] [--redis redis://127.0.0.1:6379/0]

Runs the real command, as an operator would, four ways: --dry-run, --confirmed
(SQL only), the default (SQL plus one queued confirmation job per address) and
a re-run of the same file (everything existing). Each of the first three starts
from an empty database; the Redis keys of its private queue are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

MAILER = str(Path(sys.executable).parent / "mailer")


def make_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,name\n")
        for i in range(rows):
            fh.write(f"subscriber{i:07d}@example{i % 50}.org,Subscriber {i}\n")


def run(env: dict[str, str], *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([MAILER, *args], env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    summary = [ln for ln in proc.stdout.splitlines() if not ln.startswith("line ")]
    return elapsed, ", ".join(summary[-8:])


async def clean(redis_url: str, queue: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        for pattern in (f"{queue}*", f"arq:*:{queue}:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=5000)]
            for start in range(0, len(keys), 5000):
                await client.delete(*keys[start : start + 5000])
    finally:
        await client.aclose()


def fresh_env(workdir: Path, name: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(
        MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{workdir / (name + '.db')}",
        MAILER_REDIS_URL=redis_url,
        MAILER_QUEUE_NAME=f"bench-import-{uuid.uuid4().hex[:8]}",
        MAILER_BASE_URL="https://news.example.org",
        MAILER_SECRET_KEY="bench-secret-key-0123456789abcdef",
    )
    subprocess.run([MAILER, "migrate"], env=env, check=True, capture_output=True)
    return env


def line(label: str, elapsed: float, rows: int, summary: str) -> str:
    return f"{label:36s} {elapsed:6.1f} s  {rows / elapsed:8.0f} rows/s  [{summary}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--redis", default=os.environ.get("MAILER_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailer-bench-import-") as tmp:
        workdir = Path(tmp)
        csv_path = workdir / "list.csv"
        make_csv(csv_path, args.rows)
        size_mb = csv_path.stat().st_size / 1e6
        print(f"# import of {args.rows} rows ({size_mb:.1f} MB) into SQLite")
        print(f"# {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
        cases = [
            ("dry run", "dry", ["--dry-run"], False),
            (
                "--confirmed (SQL only)",
                "confirmed",
                ["--confirmed", "--consent-source", "bench"],
                False,
            ),
            ("default (SQL + confirmation jobs)", "default", [], True),
        ]
        for label, name, flags, rerun in cases:
            env = fresh_env(workdir, name, args.redis)
            try:
                elapsed, summary = run(env, "subscribers", "import", str(csv_path), *flags)
                print(line(label, elapsed, args.rows, summary))
                if rerun:
                    elapsed, summary = run(env, "subscribers", "import", str(csv_path))
                    print(line("re-run (all existing)", elapsed, args.rows, summary))
            finally:
                asyncio.run(clean(args.redis, env["MAILER_QUEUE_NAME"]))


if __name__ == "__main__":
    main()
