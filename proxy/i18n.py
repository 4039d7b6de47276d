"""User-facing text in English and Brazilian Portuguese, and numbers and dates written the way each reads them.

Pages follow the browser's `Accept-Language` (`negotiate`); the inline notice and the 429 message follow the
`LOCALE` setting. A message is a `str.format` template: `text(locale, key, **values)`.
"""

from __future__ import annotations

from datetime import datetime

from . import admin_messages, messages

LOCALES = ("en", "pt-BR")
DEFAULT = "en"

# The dashboard's words beside everyone else's: one table per locale.
_MESSAGES = {locale: {**messages.MESSAGES[locale], **admin_messages.ADMIN[locale]} for locale in LOCALES}

_MONTHS = {
    "en": "January February March April May June July August September October November December".split(),
    "pt-BR": "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro".split(),
}


def check(locale: str) -> str:
    if locale not in LOCALES:
        raise ValueError(f"LOCALE must be one of {', '.join(LOCALES)}, not {locale!r}")
    return locale


def text(locale: str, key: str, **values: object) -> str:
    """The message `key` in `locale` (English when the locale lacks it), filled with `values`."""
    template = _MESSAGES.get(locale, _MESSAGES[DEFAULT]).get(key) or _MESSAGES[DEFAULT][key]
    return template.format(**values) if values else template


def keys(locale: str) -> set[str]:
    return set(_MESSAGES[locale])


def negotiate(accept_language: str | None) -> str:
    """The best of LOCALES for an `Accept-Language` header (any Portuguese reads pt-BR), else English."""
    best, best_q = DEFAULT, 0.0
    for position, part in enumerate((accept_language or "")[:1000].split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if not 0 < q <= 1:
            continue
        primary = tag.strip().lower().split("-")[0]
        locale = "pt-BR" if primary == "pt" else "en" if primary == "en" else None
        # Earlier entries win ties, as the header's order is the browser's preference.
        if locale is not None and q - position * 1e-6 > best_q:
            best, best_q = locale, q - position * 1e-6
    return best


def number(value: float, locale: str, decimals: int = 0) -> str:
    """1,234,567.8 in English; 1.234.567,8 in Portuguese."""
    out = f"{value:,.{decimals}f}"
    if locale == "pt-BR":
        out = out.replace(",", "\0").replace(".", ",").replace("\0", ".")
    return out


def date(at: datetime, locale: str) -> str:
    """14 December 2026; 14 de dezembro de 2026."""
    month = _MONTHS.get(locale, _MONTHS[DEFAULT])[at.month - 1]
    if locale == "pt-BR":
        return f"{at.day} de {month} de {at.year}"
    return f"{at.day} {month} {at.year}"


def month(at: datetime, locale: str) -> str:
    """December 2026; dezembro de 2026."""
    name = _MONTHS.get(locale, _MONTHS[DEFAULT])[at.month - 1]
    return f"{name} de {at.year}" if locale == "pt-BR" else f"{name.capitalize()} {at.year}"


def short_date(at: datetime, locale: str) -> str:
    """12-14 (a chart axis, a table of days); 14/12 in Portuguese."""
    return f"{at.day:02d}/{at.month:02d}" if locale == "pt-BR" else f"{at.month:02d}-{at.day:02d}"


def moment(at: datetime, locale: str) -> str:
    """A time to the minute, UTC: 2026-12-14 09:30; 14/12/2026 09:30."""
    if locale == "pt-BR":
        return f"{at:%d/%m/%Y %H:%M}"
    return f"{at:%Y-%m-%d %H:%M}"
