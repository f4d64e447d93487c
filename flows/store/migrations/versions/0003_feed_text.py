"""Feed text: relative links made absolute and re-keyed, mojibake repaired or flagged.

Earlier versions stored an item's link as the feed gave it, so a relative link
(``story/1.html``) stayed relative and its dedup key (``link`` + the link) was shared by every
feed that used the same relative path. Now links are resolved and an absolute link is the key.
This migration brings stored rows to the same form, so the next ingest stores nothing twice:
each relative link is resolved against its feed's URL (the feed's ``xml:base`` and
``Content-Location`` of the time were not stored; for the usual feed, whose links are relative
to its own URL, the result is the same) and a row keyed by that link gets the new key.

Earlier versions also stored feeds in an undeclared single-byte encoding as mojibake
(``ëÁË ÐÅÒÅÖÉÔØ`` for ``Как пережить``). Where the round trip is detectable (the stored text,
encoded back as windows-1252 or Latin-1, reads as valid UTF-8 or as plausible Russian in
windows-1251 or KOI8-R: ``flows.sources.encoding.repair_mojibake``) the text is repaired and
``text_status`` says ``repaired``; text that looks garbled with no round trip that fits is left
as it is, ``text_status`` ``garbled``, and kept out of prompts. A row keyed by its text is
re-keyed with the repaired text.

When a new key is already taken (two rows were the same story all along), the older row stays,
the newer one goes, and prompts that named the newer key name the older one. Re-keying also
rewrites the keys in ``prompts.item_keys_json``. Downgrade drops ``text_status``; repaired text
and absolute links stay (they are correct under either schema).

Revision ID: 0003_feed_text
Revises: 0002_prompt_claims
"""

import hashlib
from urllib.parse import urljoin

import sqlalchemy as sa
from alembic import op

from flows.sources.encoding import repair_mojibake
from flows.sources.feeds import dedup_key, is_absolute

revision = "0003_feed_text"
down_revision = "0002_prompt_claims"
branch_labels = None
depends_on = None

news = sa.table(
    "news_items",
    sa.column("id", sa.Integer),
    sa.column("dedup_key", sa.String),
    sa.column("feed_id", sa.Integer),
    sa.column("source", sa.String),
    sa.column("guid", sa.Text),
    sa.column("title", sa.Text),
    sa.column("summary", sa.Text),
    sa.column("link", sa.Text),
    sa.column("text_status", sa.String),
)
feeds = sa.table("feeds", sa.column("id", sa.Integer), sa.column("url", sa.Text))
tickers = sa.table("news_item_tickers", sa.column("item_id", sa.Integer))
prompts = sa.table("prompts", sa.column("key", sa.String), sa.column("item_keys_json", sa.Text))


def upgrade() -> None:
    # Plain ALTER TABLE, as in 0002: batch mode would rebuild the table on SQLite.
    op.add_column("news_items", sa.Column("text_status", sa.String(16)))
    bind = op.get_bind()
    feed_urls = dict(bind.execute(sa.select(feeds.c.id, feeds.c.url)).all())
    renamed: dict[str, str] = {}  # old key -> new key
    for row in _all_rows(bind):
        changes = _fixed(row, feed_urls.get(row["feed_id"]))
        if not changes:
            continue
        new_key = changes.get("dedup_key", row["dedup_key"])
        if new_key != row["dedup_key"]:
            taken = bind.execute(sa.select(news.c.id).where(news.c.dedup_key == new_key)).scalar()
            renamed[row["dedup_key"]] = new_key
            if taken is not None:  # the same story, stored earlier: keep that row
                bind.execute(sa.delete(tickers).where(tickers.c.item_id == row["id"]))
                bind.execute(sa.delete(news).where(news.c.id == row["id"]))
                continue
        bind.execute(sa.update(news).where(news.c.id == row["id"]).values(**changes))
    if renamed:
        _rename_prompt_keys(bind, renamed)


def _all_rows(bind, batch_rows: int = 1000):
    """Every news row, in batches by id (the table can be large; rows change as we go)."""
    last_id = 0
    while True:
        query = sa.select(news).where(news.c.id > last_id).order_by(news.c.id).limit(batch_rows)
        batch = bind.execute(query).mappings().all()
        if not batch:
            return
        yield from batch
        last_id = batch[-1]["id"]


def _fixed(row, feed_url: str | None) -> dict:
    """The column values that change for one stored row (empty when none do)."""
    changes = {}
    old_key = row["dedup_key"]
    link = row["link"]
    if link and not is_absolute(link) and feed_url:
        absolute = urljoin(feed_url, link.strip())
        if is_absolute(absolute):
            changes["link"] = absolute
            if old_key == _hash_of(f"link\n{link.strip()}"):
                changes["dedup_key"] = dedup_key(row["source"], None, absolute, "", "")
    title, title_verdict = repair_mojibake(row["title"])
    summary, summary_verdict = repair_mojibake(row["summary"])
    verdicts = {title_verdict, summary_verdict}
    if "garbled" in verdicts:
        changes["text_status"] = "garbled"
    elif "repaired" in verdicts:
        changes["text_status"] = "repaired"
    if "repaired" in verdicts:
        changes["title"], changes["summary"] = title, summary
        source = row["source"]
        # A row keyed by its text: the key was made from the title as the feed gave it, or from
        # an empty title (then the stored title is the summary's start).
        for given, fixed in ((row["title"], title), ("", "")):
            if old_key == dedup_key(source, None, None, given, row["summary"]):
                changes["dedup_key"] = dedup_key(source, None, None, fixed, summary)
    return changes


def _hash_of(basis: str) -> str:
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()


def _rename_prompt_keys(bind, renamed: dict[str, str]) -> None:
    """Point prompts' item keys (a JSON array of hex keys, kept as text) at the new keys."""
    for key, keys_json in bind.execute(sa.select(prompts.c.key, prompts.c.item_keys_json)).all():
        updated = keys_json
        for old, new in renamed.items():
            updated = updated.replace(f'"{old}"', f'"{new}"')
        if updated != keys_json:
            bind.execute(
                sa.update(prompts).where(prompts.c.key == key).values(item_keys_json=updated)
            )


def downgrade() -> None:
    op.drop_column("news_items", "text_status")
