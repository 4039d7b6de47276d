-- Grants: tokens added to one subject's budget for the period they were granted in, with who, when and
-- why. The effective limit is the budget row's limit plus the period's grants that were not revoked.
create table if not exists budget_grants (
    id           bigserial   primary key,
    subject_type text        not null check (subject_type in ('user', 'tenant')),
    subject      text        not null,
    tokens       bigint      not null check (tokens > 0),
    period_start timestamptz not null,   -- the start of the budget period the grant adds to
    reason       text        not null,
    granted_by   text        not null,
    granted_at   timestamptz not null default now(),
    revoked_at   timestamptz,
    revoked_by   text
);
create index if not exists budget_grants_subject on budget_grants (subject_type, subject, period_start)
    where revoked_at is null;

create or replace view grants_this_period as
select g.id, g.subject_type, g.subject, g.tokens, g.reason, g.granted_by, g.granted_at, g.period_start
from budget_grants g
where g.revoked_at is null and g.period_start >= now() - interval '366 days'
  and g.period_start = quota_period_start(
        coalesce((select b.period from budgets b where b.subject_type = g.subject_type and b.subject = g.subject),
                 (select d.period from budgets d where d.subject_type = g.subject_type and d.subject = '*'),
                 'month'),
        now());

-- budget_status counts the period's grants: it is redefined, with rollover, in 008_rollover.sql.
