-- Requests to EXEMPT_MODELS (a free local model, say) are recorded, marked exempt, and never counted
-- against a budget: not by the proxy, not by the rebuild from this table, not by budget_status.
alter table usage_records add column if not exists exempt boolean not null default false;

create or replace view usage_daily as
select (created_at at time zone 'UTC')::date as day, user_id, tenant_id, model,
       count(*) as requests,
       sum(prompt_tokens)::bigint as prompt_tokens,
       sum(completion_tokens)::bigint as completion_tokens,
       sum(total_tokens)::bigint as tokens,
       sum(cost_usd) as cost_usd,
       count(*) filter (where estimated) as estimated_requests,
       count(*) filter (where exempt) as exempt_requests
from usage_records
group by 1, 2, 3, 4;

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
           coalesce(b.token_limit, d.token_limit) as token_limit,
           coalesce(b.warn_ratio, d.warn_ratio) as warn_ratio,
           b.subject is null as is_default
    from subjects s
    left join budgets b on b.subject_type = s.subject_type and b.subject = s.subject
    left join budgets d on d.subject_type = s.subject_type and d.subject = '*'
),
spent as (
    select l.*, quota_period_start(l.period, now()) as period_start, quota_period_end(l.period, now()) as resets_at,
           coalesce(case l.subject_type
               when 'user' then (select sum(r.total_tokens) from usage_records r
                                 where r.user_id = l.subject and r.created_at >= quota_period_start(l.period, now())
                                   and not r.exempt)
               else (select sum(r.total_tokens) from usage_records r
                     where r.tenant_id = l.subject and r.created_at >= quota_period_start(l.period, now())
                       and not r.exempt)
           end, 0)::bigint as used
    from limits l
    where l.token_limit is not null
)
select subject_type, subject, period, token_limit, used,
       greatest(token_limit - used, 0) as remaining,
       round(100.0 * used / nullif(token_limit, 0), 1) as percent,
       case when used >= token_limit then 'blocked'
            when used >= warn_ratio * token_limit then 'warn'
            else 'ok' end as state,
       is_default, period_start, resets_at
from spent;

