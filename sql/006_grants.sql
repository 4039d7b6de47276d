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

-- budget_status with the period's grants: token_limit is the effective limit, granted what grants add.
create or replace view budget_status as
with subjects as (
    select distinct 'user'::text as subject_type, user_id as subject from usage_records
    union
    select distinct 'tenant', tenant_id from usage_records where tenant_id is not null
    union
    select subject_type, subject from budgets where subject <> '*'
),
limits as (
    select s.subject_type, s.subject,
           coalesce(b.period, d.period) as period,
           coalesce(b.token_limit, d.token_limit) as base_limit,
           coalesce(b.warn_ratio, d.warn_ratio) as warn_ratio,
           b.subject is null as is_default
    from subjects s
    left join budgets b on b.subject_type = s.subject_type and b.subject = s.subject
    left join budgets d on d.subject_type = s.subject_type and d.subject = '*'
),
spent as (
    select l.*, quota_period_start(l.period, now()) as period_start, quota_period_end(l.period, now()) as resets_at,
           coalesce((select sum(g.tokens) from budget_grants g
                     where g.subject_type = l.subject_type and g.subject = l.subject and g.revoked_at is null
                       and g.period_start = quota_period_start(l.period, now())), 0)::bigint as granted,
           coalesce(case l.subject_type
               when 'user' then (select sum(r.total_tokens) from usage_records r
                                 where r.user_id = l.subject and r.created_at >= quota_period_start(l.period, now())
                                   and not r.exempt)
               else (select sum(r.total_tokens) from usage_records r
                     where r.tenant_id = l.subject and r.created_at >= quota_period_start(l.period, now())
                       and not r.exempt)
           end, 0)::bigint as used
    from limits l
    where l.base_limit is not null
)
select subject_type, subject, period, base_limit + granted as token_limit, used,
       greatest(base_limit + granted - used, 0) as remaining,
       round(100.0 * used / nullif(base_limit + granted, 0), 1) as percent,
       case when used >= base_limit + granted then 'blocked'
            when used >= warn_ratio * (base_limit + granted) then 'warn'
            else 'ok' end as state,
       is_default, period_start, resets_at, granted
from spent;
