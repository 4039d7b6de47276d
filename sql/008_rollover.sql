-- Rollover: a budget row of a named user or tenant may carry a fraction of the last period's unused
-- budget into the current one, at most a fraction of its limit. Computed from usage_records, so it
-- survives a Redis loss. The last period's limit is taken as the row's current one.
alter table budgets add column if not exists rollover_ratio double precision not null default 0
    check (rollover_ratio >= 0 and rollover_ratio <= 1);
alter table budgets add column if not exists rollover_cap_ratio double precision not null default 0.5
    check (rollover_cap_ratio >= 0 and rollover_cap_ratio <= 1);

-- What each row with rollover carries into its subject's current period.
create or replace view budget_rollover as
select b.subject_type, b.subject, quota_period_start(b.period, now()) as period_start,
       least(floor(b.rollover_ratio * greatest(b.token_limit - u.used_before, 0)),
             floor(b.rollover_cap_ratio * b.token_limit))::bigint as carried,
       u.used_before
from budgets b
cross join lateral (
    select coalesce(sum(r.total_tokens), 0)::bigint as used_before
    from usage_records r
    where ((b.subject_type = 'user' and r.user_id = b.subject) or (b.subject_type = 'tenant' and r.tenant_id = b.subject))
      and r.created_at >= quota_period_start(b.period, quota_period_start(b.period, now()) - interval '1 microsecond')
      and r.created_at < quota_period_start(b.period, now())
      and not r.exempt
) u
where b.rollover_ratio > 0 and b.period <> 'total' and b.subject <> '*' and b.subject_type in ('user', 'tenant');

-- budget_status as it stands: token_limit is the row's limit plus this period's grants (006) and carry;
-- exempt requests (005) are left out; only user and tenant rows are subjects.
create or replace view budget_status as
with subjects as (
    select distinct 'user'::text as subject_type, user_id as subject from usage_records
    union
    select distinct 'tenant', tenant_id from usage_records where tenant_id is not null
    union
    select subject_type, subject from budgets where subject <> '*' and subject_type in ('user', 'tenant')
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
                       and g.period_start = quota_period_start(l.period, now())), 0)::bigint
         + coalesce((select c.carried from budget_rollover c
                     where c.subject_type = l.subject_type and c.subject = l.subject), 0)::bigint as granted,
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
