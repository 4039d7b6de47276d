"""User-facing text in English and Brazilian Portuguese, and numbers and dates written the way each reads them.

Pages follow the browser's `Accept-Language` (`negotiate`); the inline notice and the 429 message follow the
`LOCALE` setting. A message is a `str.format` template: `text(locale, key, **values)`.
"""

from __future__ import annotations

from datetime import datetime

LOCALES = ("en", "pt-BR")
DEFAULT = "en"

_MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        # The messages the proxy adds to answers (LOCALE).
        "period.day": "daily",
        "period.week": "weekly",
        "period.month": "monthly",
        "period.total": "total",
        "notice.warn": "You have used {percent} % of your {period} token budget ({used} of {limit}).",
        "notice.blocked": "You have used all of your {period} token budget ({used} of {limit}):"
        " your next message will be refused {until}.",
        "notice.until": "until {at} UTC",
        "notice.until_admin": "until your administrator adds more",
        "notice.link": "[See your usage statement]({url})",
        "refusal.what": "{period} token budget",
        "refusal.what_team": "Your team's ({subject}) {period} token budget",
        "refusal.for_models": "{what} for {model} models",
        "refusal.resets": "It resets on {at} UTC.",
        "refusal.no_reset": "It does not reset; ask your administrator for more.",
        "refusal.used_up": "{what} used up: {used} of {limit} tokens. {resets}",
        "refusal.in_progress": "{what} is fully taken by requests in progress: {used} of {limit} tokens used,"
        " {reserved} reserved. Try again when they finish. {resets}",
        "refusal.too_large": "This request is larger than your whole {period} token budget of {limit} tokens:"
        " shorten the conversation or the input. {resets}",
        "refusal.too_large_team": "This request is larger than your team's ({subject}) whole {period} token budget"
        " of {limit} tokens: shorten the conversation or the input. {resets}",
        "refusal.nearly": "{what} is nearly used up: {used} of {limit} tokens used, and the {left} left are too few"
        " for this request. {resets}",
        "refusal.link": "Your usage statement: {url}",
        "rate.requests": "Rate limit reached: {limit} requests per minute. Try again in {seconds} s.",
        "rate.tokens": "Rate limit reached: {limit} tokens per minute. Try again in {seconds} s.",
        # The pages (Accept-Language).
        "site.name": "Token budget",
        "site.skip": "Skip to content",
        "site.footer": "Served by the quota proxy. Times are in UTC.",
        "nav.main": "Main",
        "me.title": "Your usage statement",
        "me.for_user": "Statement for {user}",
        "me.gauge": "Budget used",
        "me.gauge_label": "{used} of {limit} tokens used ({percent} %)",
        "me.remaining": "{remaining} tokens left",
        "me.state.ok": "Within budget",
        "me.state.warn": "Nearly used up",
        "me.state.blocked": "Used up",
        "me.state.unknown": "Not known right now",
        "me.resets": "Resets on {at}",
        "me.resets_in": "in {days} d {hours} h",
        "me.resets_in_hours": "in {hours} h {minutes} min",
        "me.no_reset": "This budget does not reset; ask your administrator for more.",
        "me.forecast_reach": "At this pace you reach your limit on {date}.",
        "me.forecast_not": "At this pace you will not reach your limit this period.",
        "me.forecast_reached": "You have reached your limit for this period.",
        "me.forecast_none": "No usage yet this period.",
        "me.live_down": "The live budget counters cannot be read right now; your history below is still complete.",
        "me.history_down": "Your usage history cannot be read right now (the database is unreachable).",
        "me.team": "Your team's budget",
        "me.team_label": "Team {tenant}",
        "me.cap": "Cap for {model} models",
        "me.daily": "Tokens per day",
        "me.daily_empty": "No usage in this period yet.",
        "me.by_model": "By model",
        "me.recent": "Last {n} requests",
        "me.recent_empty": "No requests in this period yet.",
        "me.previous": "Previous periods",
        "me.download": "Download this period as CSV",
        "me.period": "Period: {start} to {end}",
        "me.period_open": "Since {start}",
        "me.sign_out": "Sign out",
        "col.time": "Time",
        "col.model": "Model",
        "col.tokens_in": "Tokens in",
        "col.tokens_out": "Tokens out",
        "col.total": "Total tokens",
        "col.requests": "Requests",
        "col.status": "Status",
        "col.period": "Period",
        "col.cost": "Cost (USD)",
        "status.ok": "ok",
        "status.cancelled": "cancelled",
        "status.upstream_error": "upstream error",
        "status.blocked": "blocked",
        "status.rate_limited": "rate limited",
        "status.invalid": "invalid request",
        "status.unavailable": "unavailable",
        "status.error": "error",
        "status.estimated": "estimated",
        "chart.daily_title": "Tokens per day, by model",
        "chart.daily_desc": "Stacked bars, one per day of the period; total {total} tokens.",
        "chart.axis_tokens": "tokens",
        "chart.other": "other models",
        "chart.gauge_title": "Budget used",
        "signin.title": "Open your usage statement",
        "signin.intro": "Follow the link in your chat to open your statement, or paste your API token here.",
        "signin.token": "API token",
        "signin.submit": "Open my statement",
        "signin.bad_token": "That token was not accepted: {reason}",
        "link.expired_title": "This link has expired",
        "link.expired": "Statement links work for a few days only. Send a new message in your chat to get a fresh "
        "link, or sign in with your API token below.",
        "link.forged_title": "This link is not valid",
        "link.forged": "The link was not made by this proxy, or it was cut short when it was copied. "
        "Use the link from your chat again, or sign in with your API token below.",
        "error.title": "Something went wrong",
        "error.not_found": "There is no page here.",
    },
    "pt-BR": {
        "period.day": "diário",
        "period.week": "semanal",
        "period.month": "mensal",
        "period.total": "total",
        "notice.warn": "Você já usou {percent} % do seu orçamento {period} de tokens ({used} de {limit}).",
        "notice.blocked": "Você usou todo o seu orçamento {period} de tokens ({used} de {limit}):"
        " sua próxima mensagem será recusada {until}.",
        "notice.until": "até {at} UTC",
        "notice.until_admin": "até que seu administrador libere mais",
        "notice.link": "[Veja seu extrato de uso]({url})",
        "refusal.what": "Orçamento {period} de tokens",
        "refusal.what_team": "Orçamento {period} de tokens da sua equipe ({subject})",
        "refusal.for_models": "{what} para os modelos {model}",
        "refusal.resets": "Ele é renovado em {at} UTC.",
        "refusal.no_reset": "Ele não é renovado; peça mais ao seu administrador.",
        "refusal.used_up": "{what} esgotado: {used} de {limit} tokens. {resets}",
        "refusal.in_progress": "{what} totalmente ocupado por pedidos em andamento: {used} de {limit} tokens usados,"
        " {reserved} reservados. Tente de novo quando terminarem. {resets}",
        "refusal.too_large": "Este pedido é maior que todo o seu orçamento {period} de {limit} tokens:"
        " encurte a conversa ou o texto. {resets}",
        "refusal.too_large_team": "Este pedido é maior que todo o orçamento {period} de {limit} tokens da sua equipe"
        " ({subject}): encurte a conversa ou o texto. {resets}",
        "refusal.nearly": "{what} quase esgotado: {used} de {limit} tokens usados, e os {left} restantes não bastam"
        " para este pedido. {resets}",
        "refusal.link": "Seu extrato de uso: {url}",
        "rate.requests": "Limite de ritmo atingido: {limit} pedidos por minuto. Tente de novo em {seconds} s.",
        "rate.tokens": "Limite de ritmo atingido: {limit} tokens por minuto. Tente de novo em {seconds} s.",
        "site.name": "Orçamento de tokens",
        "site.skip": "Pular para o conteúdo",
        "site.footer": "Servido pelo proxy de cotas. Horários em UTC.",
        "nav.main": "Principal",
        "me.title": "Seu extrato de uso",
        "me.for_user": "Extrato de {user}",
        "me.gauge": "Orçamento usado",
        "me.gauge_label": "{used} de {limit} tokens usados ({percent} %)",
        "me.remaining": "Restam {remaining} tokens",
        "me.state.ok": "Dentro do orçamento",
        "me.state.warn": "Quase esgotado",
        "me.state.blocked": "Esgotado",
        "me.state.unknown": "Desconhecido no momento",
        "me.resets": "Renova em {at}",
        "me.resets_in": "daqui a {days} d {hours} h",
        "me.resets_in_hours": "daqui a {hours} h {minutes} min",
        "me.no_reset": "Este orçamento não é renovado; peça mais ao seu administrador.",
        "me.forecast_reach": "Neste ritmo você atinge seu limite em {date}.",
        "me.forecast_not": "Neste ritmo você não atingirá seu limite neste período.",
        "me.forecast_reached": "Você atingiu seu limite neste período.",
        "me.forecast_none": "Nenhum uso neste período ainda.",
        "me.live_down": "Os contadores do orçamento não podem ser lidos agora; seu histórico abaixo continua completo.",
        "me.history_down": "Seu histórico de uso não pode ser lido agora (o banco de dados está fora do ar).",
        "me.team": "Orçamento da sua equipe",
        "me.team_label": "Equipe {tenant}",
        "me.cap": "Limite para os modelos {model}",
        "me.daily": "Tokens por dia",
        "me.daily_empty": "Nenhum uso neste período ainda.",
        "me.by_model": "Por modelo",
        "me.recent": "Últimos {n} pedidos",
        "me.recent_empty": "Nenhum pedido neste período ainda.",
        "me.previous": "Períodos anteriores",
        "me.download": "Baixar este período em CSV",
        "me.period": "Período: {start} a {end}",
        "me.period_open": "Desde {start}",
        "me.sign_out": "Sair",
        "col.time": "Horário",
        "col.model": "Modelo",
        "col.tokens_in": "Tokens de entrada",
        "col.tokens_out": "Tokens de saída",
        "col.total": "Total de tokens",
        "col.requests": "Pedidos",
        "col.status": "Situação",
        "col.period": "Período",
        "col.cost": "Custo (USD)",
        "status.ok": "ok",
        "status.cancelled": "cancelado",
        "status.upstream_error": "erro no modelo",
        "status.blocked": "bloqueado",
        "status.rate_limited": "limite de ritmo",
        "status.invalid": "pedido inválido",
        "status.unavailable": "indisponível",
        "status.error": "erro",
        "status.estimated": "estimado",
        "chart.daily_title": "Tokens por dia, por modelo",
        "chart.daily_desc": "Barras empilhadas, uma por dia do período; total de {total} tokens.",
        "chart.axis_tokens": "tokens",
        "chart.other": "outros modelos",
        "chart.gauge_title": "Orçamento usado",
        "signin.title": "Abra seu extrato de uso",
        "signin.intro": "Siga o link no seu chat para abrir seu extrato, ou cole aqui seu token de API.",
        "signin.token": "Token de API",
        "signin.submit": "Abrir meu extrato",
        "signin.bad_token": "Esse token não foi aceito: {reason}",
        "link.expired_title": "Este link expirou",
        "link.expired": "Os links de extrato valem só por alguns dias. Envie uma nova mensagem no chat para receber "
        "um link novo, ou entre com seu token de API abaixo.",
        "link.forged_title": "Este link não é válido",
        "link.forged": "O link não foi gerado por este proxy, ou foi cortado ao ser copiado. "
        "Use de novo o link do seu chat, ou entre com seu token de API abaixo.",
        "error.title": "Algo deu errado",
        "error.not_found": "Não há nenhuma página aqui.",
    },
}

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


# The admin dashboard (`/admin`, admin_pages.py): its own block, added to both locales.
_MESSAGES["en"].update(
    {
        "admin.title": "Token budgets · admin",
        "admin.footer": "Signed in as {admin}. Times are in UTC.",
        "admin.nav.overview": "Overview",
        "admin.nav.users": "Users",
        "admin.nav.tenants": "Tenants",
        "admin.nav.blocked": "Blocked requests",
        "admin.nav.changes": "Budget changes",
        "admin.sign_out": "Sign out ({admin})",
        "admin.signin_title": "Sign in to the dashboard",
        "admin.signin_intro": "Paste an admin token (a token with the admin claim). It is checked once and never"
        " kept; the dashboard then remembers you for a few hours.",
        "admin.signin_link": "Or open a one-time link printed on the proxy's host by",
        "admin.token": "Admin token",
        "admin.signin_submit": "Sign in",
        "admin.token_empty": "Paste a token first.",
        "admin.token_refused": "That token was not accepted: {reason}",
        "admin.csrf_failed": "This form is out of date or did not come from this dashboard (CSRF token missing or"
        " wrong). Open the page again and resend it.",
        "admin.session_expired": "Your session has ended: sign in again.",
        "admin.refused": "Not allowed",
        "admin.link_title": "One-time sign-in link",
        "admin.link_intro": "This link signs {name} in to the dashboard, once.",
        "admin.link_submit": "Sign in",
        "admin.link_used": "This one-time link has been used already: print a new one, or sign in with a token.",
        "admin.link_expired": "This one-time link has expired: print a new one, or sign in with a token.",
        "admin.link_forged": "This link is not valid (not made by this proxy, or cut short when copied).",
        "admin.period": "Period",
        "admin.period.day": "Today",
        "admin.period.week": "This week",
        "admin.period.month": "This month",
        "admin.period.total": "All time",
        "admin.show": "Show",
        "admin.window": "From {start} to {end} (UTC)",
        "admin.all_time": "All time",
        "admin.totals": "Totals",
        "admin.tokens": "Tokens",
        "admin.active_users": "Active users",
        "admin.users_warn": "Users nearly out",
        "admin.users_blocked": "Users used up",
        "admin.blocked_requests": "Blocked requests",
        "admin.daily": "Tokens per day, by model",
        "admin.top_users": "Top users",
        "admin.csv": "Download as CSV",
        "admin.no_users": "No users match.",
        "admin.no_tenants": "No tenants yet.",
        "admin.no_blocked": "No blocked requests in this period.",
        "admin.no_changes": "No changes recorded.",
        "admin.none": "none",
        "admin.users_found": "{n} users",
        "admin.blocked_found": "{n} blocked requests",
        "admin.search_users": "Search users",
        "admin.search": "User id (* and ? are wildcards)",
        "admin.any": "Any",
        "admin.sort": "Sort by",
        "admin.sort.used": "Most used",
        "admin.sort.-used": "Least used",
        "admin.sort.percent": "Highest percent",
        "admin.sort.-percent": "Lowest percent",
        "admin.sort.user": "User id A-Z",
        "admin.sort.-user": "User id Z-A",
        "admin.sort.tenant": "Tenant",
        "admin.sort.requests": "Most requests",
        "admin.state.ok": "Within budget",
        "admin.state.warn": "Nearly used up",
        "admin.state.blocked": "Used up",
        "admin.state.none": "No budget",
        "admin.col.user": "User",
        "admin.col.tenant": "Tenant",
        "admin.col.used": "Used",
        "admin.col.limit": "Limit (tokens)",
        "admin.col.request": "Request id",
        "admin.col.subject": "Budget of",
        "admin.col.who": "Changed by",
        "admin.col.before": "Before",
        "admin.col.after": "After",
        "admin.members": "Members",
        "admin.budget": "Budget",
        "admin.pages": "Pages",
        "admin.prev": "Previous",
        "admin.next": "Next",
        "admin.page_of": "Page {page} of {pages}",
        "admin.own_budget": "Own budget",
        "admin.default_budget": "Default budget",
        "admin.saved": "Saved: the new budget is in force.",
        "admin.change_budget": "Change the budget",
        "admin.rpm": "Requests per minute",
        "admin.tpm": "Tokens per minute",
        "admin.warn": "Warn at (%)",
        "admin.warn_at": "warn at {percent} %",
        "admin.reason": "Reason (for the history)",
        "admin.zero_no_limit": "0 requests or tokens per minute: no rate limit. The change takes effect at once.",
        "admin.save": "Save",
        "admin.history": "History of changes",
        "admin.per.day": "a day",
        "admin.per.week": "a week",
        "admin.per.month": "a month",
        "admin.per.total": "in all",
    }
)
_MESSAGES["pt-BR"].update(
    {
        "admin.title": "Orçamentos de tokens · admin",
        "admin.footer": "Conectado como {admin}. Horários em UTC.",
        "admin.nav.overview": "Visão geral",
        "admin.nav.users": "Usuários",
        "admin.nav.tenants": "Equipes",
        "admin.nav.blocked": "Pedidos bloqueados",
        "admin.nav.changes": "Mudanças de orçamento",
        "admin.sign_out": "Sair ({admin})",
        "admin.signin_title": "Entrar no painel",
        "admin.signin_intro": "Cole um token de administrador (um token com a claim de admin). Ele é verificado"
        " uma vez e nunca guardado; o painel então lembra de você por algumas horas.",
        "admin.signin_link": "Ou abra um link de uso único impresso no servidor do proxy por",
        "admin.token": "Token de administrador",
        "admin.signin_submit": "Entrar",
        "admin.token_empty": "Cole um token primeiro.",
        "admin.token_refused": "Esse token não foi aceito: {reason}",
        "admin.csrf_failed": "Este formulário está desatualizado ou não veio deste painel (token CSRF ausente ou"
        " errado). Abra a página de novo e reenvie.",
        "admin.session_expired": "Sua sessão terminou: entre de novo.",
        "admin.refused": "Não permitido",
        "admin.link_title": "Link de acesso de uso único",
        "admin.link_intro": "Este link conecta {name} ao painel, uma única vez.",
        "admin.link_submit": "Entrar",
        "admin.link_used": "Este link de uso único já foi usado: gere outro, ou entre com um token.",
        "admin.link_expired": "Este link de uso único expirou: gere outro, ou entre com um token.",
        "admin.link_forged": "Este link não é válido (não foi gerado por este proxy, ou foi cortado ao ser copiado).",
        "admin.period": "Período",
        "admin.period.day": "Hoje",
        "admin.period.week": "Esta semana",
        "admin.period.month": "Este mês",
        "admin.period.total": "Todo o período",
        "admin.show": "Mostrar",
        "admin.window": "De {start} a {end} (UTC)",
        "admin.all_time": "Todo o período",
        "admin.totals": "Totais",
        "admin.tokens": "Tokens",
        "admin.active_users": "Usuários ativos",
        "admin.users_warn": "Usuários quase no limite",
        "admin.users_blocked": "Usuários esgotados",
        "admin.blocked_requests": "Pedidos bloqueados",
        "admin.daily": "Tokens por dia, por modelo",
        "admin.top_users": "Maiores usuários",
        "admin.csv": "Baixar em CSV",
        "admin.no_users": "Nenhum usuário encontrado.",
        "admin.no_tenants": "Nenhuma equipe ainda.",
        "admin.no_blocked": "Nenhum pedido bloqueado neste período.",
        "admin.no_changes": "Nenhuma mudança registrada.",
        "admin.none": "nenhum",
        "admin.users_found": "{n} usuários",
        "admin.blocked_found": "{n} pedidos bloqueados",
        "admin.search_users": "Buscar usuários",
        "admin.search": "Id do usuário (* e ? são curingas)",
        "admin.any": "Qualquer",
        "admin.sort": "Ordenar por",
        "admin.sort.used": "Mais uso",
        "admin.sort.-used": "Menos uso",
        "admin.sort.percent": "Maior percentual",
        "admin.sort.-percent": "Menor percentual",
        "admin.sort.user": "Id de A a Z",
        "admin.sort.-user": "Id de Z a A",
        "admin.sort.tenant": "Equipe",
        "admin.sort.requests": "Mais pedidos",
        "admin.state.ok": "Dentro do orçamento",
        "admin.state.warn": "Quase esgotado",
        "admin.state.blocked": "Esgotado",
        "admin.state.none": "Sem orçamento",
        "admin.col.user": "Usuário",
        "admin.col.tenant": "Equipe",
        "admin.col.used": "Usado",
        "admin.col.limit": "Limite (tokens)",
        "admin.col.request": "Id do pedido",
        "admin.col.subject": "Orçamento de",
        "admin.col.who": "Alterado por",
        "admin.col.before": "Antes",
        "admin.col.after": "Depois",
        "admin.members": "Membros",
        "admin.budget": "Orçamento",
        "admin.pages": "Páginas",
        "admin.prev": "Anterior",
        "admin.next": "Próxima",
        "admin.page_of": "Página {page} de {pages}",
        "admin.own_budget": "Orçamento próprio",
        "admin.default_budget": "Orçamento padrão",
        "admin.saved": "Salvo: o novo orçamento está em vigor.",
        "admin.change_budget": "Alterar o orçamento",
        "admin.rpm": "Pedidos por minuto",
        "admin.tpm": "Tokens por minuto",
        "admin.warn": "Avisar em (%)",
        "admin.warn_at": "aviso em {percent} %",
        "admin.reason": "Motivo (para o histórico)",
        "admin.zero_no_limit": "0 pedidos ou tokens por minuto: sem limite de ritmo. A mudança vale na hora.",
        "admin.save": "Salvar",
        "admin.history": "Histórico de mudanças",
        "admin.per.day": "por dia",
        "admin.per.week": "por semana",
        "admin.per.month": "por mês",
        "admin.per.total": "no total",
    }
)
