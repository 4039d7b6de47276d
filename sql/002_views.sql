-- Admin views. All times are UTC.

create or replace view usage_daily as
select (created_at at time zone 'UTC')::date as day, user_id, tenant_id, model,
       count(*) as requests,
       sum(prompt_tokens)::bigint as prompt_tokens,
       sum(completion_tokens)::bigint as completion_tokens,
       sum(total_tokens)::bigint as tokens,
       sum(cost_usd) as cost_usd,
       count(*) filter (where estimated) as estimated_requests
from usage_records
group by 1, 2, 3, 4;

create or replace view usage_monthly as
select date_trunc('month', created_at at time zone 'UTC')::date as month, user_id, tenant_id, model,
       count(*) as requests,
       sum(prompt_tokens)::bigint as prompt_tokens,
       sum(completion_tokens)::bigint as completion_tokens,
       sum(total_tokens)::bigint as tokens,
       sum(cost_usd) as cost_usd
from usage_records
group by 1, 2, 3, 4;

create or replace view usage_by_model as
select date_trunc('month', created_at at time zone 'UTC')::date as month, model,
       count(*) as requests,
       count(distinct user_id) as users,
       sum(total_tokens)::bigint as tokens,
       sum(cost_usd) as cost_usd
from usage_records
group by 1, 2;

-- Every user and tenant that has a budget (own row, or the '*' default) with its spend this period.
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
                                 where r.user_id = l.subject and r.created_at >= quota_period_start(l.period, now()))
               else (select sum(r.total_tokens) from usage_records r
                     where r.tenant_id = l.subject and r.created_at >= quota_period_start(l.period, now()))
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

create or replace view top_users_month as
select m.user_id, m.requests, m.tokens, m.cost_usd, b.token_limit, b.percent, b.state
from (
    select user_id, count(*) as requests, sum(total_tokens)::bigint as tokens, sum(cost_usd) as cost_usd
    from usage_records
    where created_at >= date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'
    group by user_id
) m
left join budget_status b on b.subject_type = 'user' and b.subject = m.user_id
order by m.tokens desc;

create or replace view blocked_requests as
select created_at, request_id, user_id, tenant_id, model, endpoint, http_status
from usage_records
where status = 'blocked';
