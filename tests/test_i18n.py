"""User-facing text in English and Brazilian Portuguese: every message in both, the locale negotiated."""

from __future__ import annotations

import string
from datetime import UTC, datetime

import pytest

from proxy import i18n


def test_every_message_exists_in_both_languages_with_the_same_placeholders() -> None:
    assert i18n.keys("en") == i18n.keys("pt-BR")
    fields = string.Formatter()
    for key in i18n.keys("en"):
        en = {f for _, f, _, _ in fields.parse(i18n.text("en", key)) if f}
        pt = {f for _, f, _, _ in fields.parse(i18n.text("pt-BR", key)) if f}
        assert en == pt, key


@pytest.mark.parametrize(
    "header, locale",
    [
        (None, "en"),
        ("", "en"),
        ("pt-BR,pt;q=0.9,en;q=0.8", "pt-BR"),
        ("pt", "pt-BR"),
        ("pt-PT", "pt-BR"),
        ("en-US,en;q=0.9,pt-BR;q=0.8", "en"),
        ("de-DE,pt-BR;q=0.5", "pt-BR"),
        ("fr, de", "en"),
        ("en;q=0.2, pt;q=0.9", "pt-BR"),
        ("pt;q=0, en", "en"),
        ("pt;q=nonsense", "en"),
        ("*", "en"),
        ("," * 10_000 + "pt", "en"),  # a hostile header is read only so far
    ],
)
def test_negotiate(header: str | None, locale: str) -> None:
    assert i18n.negotiate(header) == locale


def test_numbers_and_dates_per_locale() -> None:
    at = datetime(2026, 12, 14, 9, 5, tzinfo=UTC)
    assert i18n.number(1234567.891, "en", 1) == "1,234,567.9"
    assert i18n.number(1234567.891, "pt-BR", 1) == "1.234.567,9"
    assert i18n.number(85, "pt-BR") == "85"
    assert i18n.date(at, "en") == "14 December 2026"
    assert i18n.date(at, "pt-BR") == "14 de dezembro de 2026"
    assert i18n.moment(at, "en") == "2026-12-14 09:05"
    assert i18n.moment(at, "pt-BR") == "14/12/2026 09:05"
    assert (i18n.short_date(at, "en"), i18n.short_date(at, "pt-BR")) == ("12-14", "14/12")


def test_an_unknown_locale_reads_english_and_the_setting_refuses_it() -> None:
    assert i18n.text("fr", "me.title") == "Your usage statement"
    assert i18n.check("pt-BR") == "pt-BR"
    with pytest.raises(ValueError, match="LOCALE"):
        i18n.check("fr")
