"""The README's screenshots (docs/img/): the statement and the admin overview, over a month of plausible use.

    .venv/bin/python -m tests.readme_shots

Uses a scratch database `readme_shots` beside TEST_DATABASE_URL's and Redis DB 8, and Debian's chromium.
Not part of `make test` (the browser tests there take their own screenshots into tests/screenshots/).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from playwright.sync_api import sync_playwright

from proxy.app import create_app
from proxy.db import migrate

from .browser import ARGS, CHROMIUM, DESKTOP, PHONE
from .conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from .helpers import JWT_SECRET, serve, token

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
DATABASE = "readme_shots"
TEAM = "acme"
PEOPLE = {"ana@acme.example": 0.86, "bruno@acme.example": 0.55, "carla@acme.example": 1.0, "davi@acme.example": 0.3}
MODELS = (("gpt-4o", 0.5), ("gpt-4o-mini", 0.3), ("claude-3-5-sonnet", 0.2))
BUDGET = 100_000


def records(now: datetime) -> list[tuple[object, ...]]:
    """Each person's month so far: a few requests a working day, landing near their share of the budget."""
    rng = random.Random(7)
    rows: list[tuple[object, ...]] = []
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = [start + timedelta(days=d) for d in range((now - start).days + 1)]
    for person, share in PEOPLE.items():
        per_day = BUDGET * share / len(days)
        for day in days:
            for n in range(rng.randint(2, 6)):
                model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
                total = int(per_day / 4 * rng.uniform(0.6, 1.4))
                prompt = int(total * 0.7)
                at = min(day + timedelta(hours=9 + 2 * n, minutes=rng.randint(0, 59)), now - timedelta(minutes=n))
                rows.append(
                    (f"req-{len(rows)}", at, person, TEAM, model, "chat", prompt, total - prompt, total, "ok", False)
                )
    rows.append(("req-blocked", now, "carla@acme.example", TEAM, "gpt-4o", "chat", 0, 0, 0, "blocked", False))
    return rows


async def seed(database_url: str) -> None:
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f"drop database if exists {DATABASE} with (force)")
        await admin.execute(f"create database {DATABASE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await conn.copy_records_to_table(
            "usage_records",
            records=records(datetime.now(UTC)),
            columns=[
                "request_id",
                "created_at",
                "user_id",
                "tenant_id",
                "model",
                "endpoint",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "status",
                "estimated",
            ],
        )
    finally:
        await conn.close()


def main() -> None:
    from proxy.config import Settings

    database_url = TEST_DATABASE_URL.rsplit("/", 1)[0] + f"/{DATABASE}"
    asyncio.run(seed(database_url))
    settings = Settings(
        database_url=database_url,
        redis_url=TEST_REDIS_URL.rsplit("/", 1)[0] + "/8",
        jwt_secret=JWT_SECRET,
        litellm_master_key="sk-unused",
        litellm_base_url="http://127.0.0.1:9",
        default_token_budget=BUDGET,
        ledger_writer="off",
        log_level="warning",
    )
    OUT.mkdir(exist_ok=True)
    with serve(create_app(replace(settings))) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = browser.new_context(viewport=DESKTOP, locale="en-US")
        page = ctx.new_page()
        page.set_extra_http_headers({"Authorization": f"Bearer {token('ana@acme.example', tenant=TEAM)}"})
        page.goto(f"{url}/me")
        page.set_viewport_size({"width": DESKTOP["width"], "height": 1100})  # the gauge, the chart, the models
        page.screenshot(path=str(OUT / "statement.png"))
        page.set_viewport_size(PHONE)
        page.screenshot(path=str(OUT / "statement-phone.png"), full_page=False)
        page.set_extra_http_headers({"Authorization": f"Bearer {token('ops-lead', quota_admin=True)}"})
        page.goto(f"{url}/admin")
        page.screenshot(path=str(OUT / "admin-overview.png"), full_page=True)
        browser.close()
    print(f"wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} in {OUT}")


if __name__ == "__main__":
    main()
