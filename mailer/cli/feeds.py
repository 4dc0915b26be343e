"""``mailer feeds``: look at what the site's feeds would bring, before they bring it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # imported when a command runs, so other commands start fast
    from mailer.config import Settings
    from mailer.feed_fetch import FeedItem, Fetched

feeds_app = typer.Typer(help="The site's feeds (MAILER_FEED_URLS).")

EXCERPT = 160


async def _fetch(settings: Settings, url: str) -> Fetched:
    from mailer.feed_fetch import fetch, make_client

    async with make_client(settings) as client:
        return await fetch(
            client,
            url,
            etag=None,
            last_modified=None,
            timeout_s=settings.feed_timeout_s,
            max_bytes=settings.feed_max_bytes,
        )


async def _new_keys(settings: Settings, url: str, items: list[FeedItem]) -> set[str] | None:
    """Keys of the entries a poll would turn into statements; None when the next poll
    would be this feed's first (nothing mailed). Reads the database, writes nothing."""
    from sqlalchemy import select

    from mailer.db import make_engine, make_sessionmaker
    from mailer.feeds import split_new
    from mailer.models import Feed

    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            feed = await session.scalar(select(Feed).where(Feed.url == url))
            if feed is None or not feed.first_run_done:
                return None
            new, _ = await split_new(session, feed.id, items)
            return {i.key for i in new}
    finally:
        await engine.dispose()


@feeds_app.command("check")
def check(
    url: str = typer.Argument(..., help="The feed's URL (RSS, Atom, RDF or JSON Feed)."),
) -> None:
    """Fetch a feed and print what a poll would import from it. Writes nothing."""
    from mailer.cli.common import fail, settings_or_exit
    from mailer.cms_html import render_cms_html
    from mailer.feed_fetch import FeedError

    settings = settings_or_exit()
    try:
        fetched = asyncio.run(_fetch(settings, url))
    except FeedError as exc:
        fail(f"{url}: {exc}")
    items = fetched.items or []
    typer.echo(f"{fetched.url}: {fetched.kind} feed, {len(items)} entries")
    known = True
    try:
        new = asyncio.run(_new_keys(settings, url, items))
    except Exception as exc:  # noqa: BLE001 - the database is optional for a check
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]
        typer.echo(f"(cannot read the database, so which entries are new is unknown: {reason})")
        known, new = False, set()
    if known and new is None:
        typer.echo(
            "This feed has not been polled yet: its first poll records these entries as "
            "seen and mails none of them."
        )
    elif known and new is not None:
        typer.echo(f"{len(new)} would become statements (the others were seen before).")
    for item in items:
        mark = " ?  " if not known else "NEW " if new is not None and item.key in new else "seen"
        typer.echo(f"\n[{mark}] {item.title}")
        if item.author:
            typer.echo(f"       by {item.author}")
        typer.echo(f"       link: {item.link or '(none)'}")
        typer.echo(f"       id:   {item.key}")
        _, text = render_cms_html(item.html, item.link)
        excerpt = " ".join(text.split())
        if len(excerpt) > EXCERPT:
            excerpt = excerpt[: EXCERPT - 1] + "…"
        typer.echo(f"       text: {excerpt or '(empty)'}")


def register(app: typer.Typer) -> None:
    app.add_typer(feeds_app, name="feeds")
