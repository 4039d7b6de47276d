"""What the admin dashboard's query strings and forms may ask for, checked: a 400 naming the parameter for
anything else. The values that reach SQL are chosen from allow-lists here (sorts, states), never taken from
the request."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import PERIODS
from .errors import BadRequest

PAGE_SIZES = (25, 50, 100, 200)
MAX_PAGE = 100_000

# What the users page may sort by: the parameter's value -> the SQL (never the parameter itself).
USER_SORTS = {
    "used": "used desc, user_id",
    "-used": "used, user_id",
    "percent": "percent desc nulls last, user_id",
    "-percent": "percent nulls first, user_id",
    "user": "user_id",
    "-user": "user_id desc",
    "tenant": "tenant_id, user_id",
    "requests": "requests desc, user_id",
}
STATES = ("ok", "warn", "blocked", "none")
_GROUPED = re.compile(r"^\d{1,3}([ ,._]\d{3})+$")


def _choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...] | list[str], default: str) -> str:
    value = params.get(name) or default
    if value not in allowed:
        raise BadRequest(f"'{name}' must be one of {', '.join(allowed)}.", param=name)
    return value


def _whole(params: Mapping[str, str], name: str, low: int, high: int, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or not low <= int(raw) <= high:
        raise BadRequest(f"'{name}' must be a whole number from {low:,} to {high:,}.", param=name)
    return int(raw)


def _text(params: Mapping[str, str], name: str, most: int = 256) -> str:
    value = params.get(name, "").strip()
    if len(value) > most or not value.isprintable():
        raise BadRequest(f"'{name}' must be printable text of at most {most} characters.", param=name)
    return value


@dataclass(frozen=True, slots=True)
class UserQuery:
    """The users page's parameters, checked: `q` a search (substring; * and ? are wildcards), `tenant` exact,
    `state` one of STATES, `sort` one of USER_SORTS, `page` from 1 and `per_page` one of PAGE_SIZES."""

    q: str = ""
    tenant: str = ""
    state: str = ""
    sort: str = "used"
    page: int = 1
    per_page: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> UserQuery:
        per_page = _per_page(params)
        return cls(
            q=_text(params, "q"),
            tenant=_text(params, "tenant"),
            state=_choice(params, "state", ("", *STATES), ""),
            sort=_choice(params, "sort", list(USER_SORTS), "used"),
            page=_whole(params, "page", 1, MAX_PAGE, 1),
            per_page=per_page,
        )

    def params(self, **changes: object) -> dict[str, str]:
        """The query string of this view with some parameters changed (for links), defaults left out."""
        values = {
            "q": self.q,
            "tenant": self.tenant,
            "state": self.state,
            "sort": self.sort,
            "page": self.page,
            "per_page": self.per_page,
        }
        values.update(changes)
        defaults = {"sort": "used", "page": 1, "per_page": 50}
        return {k: str(v) for k, v in values.items() if v not in ("", None) and defaults.get(k) != v}


def _per_page(params: Mapping[str, str]) -> int:
    per_page = _whole(params, "per_page", 1, max(PAGE_SIZES), 50)
    if per_page not in PAGE_SIZES:
        raise BadRequest(f"'per_page' must be one of {', '.join(map(str, PAGE_SIZES))}.", param="per_page")
    return per_page


@dataclass(frozen=True, slots=True)
class Paging:
    page: int = 1
    per_page: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Paging:
        per_page = _per_page(params)
        return cls(_whole(params, "page", 1, MAX_PAGE, 1), per_page)


def period_param(params: Mapping[str, str], default: str) -> str:
    return _choice(params, "period", PERIODS, default)


def whole_field(form: Mapping[str, Any], name: str, default: int = 0) -> int:
    """A whole number from a form: digits, or digits grouped by threes (100,000 / 100.000 / 100 000)."""
    raw = form.get(name)
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        return default
    if text.isascii() and text.isdigit() and len(text) <= 19:
        return int(text)
    if len(text) <= 26 and _GROUPED.match(text):
        return int(re.sub(r"[ ,._]", "", text))
    raise BadRequest(f"'{name}' must be a whole number.", param=name)
