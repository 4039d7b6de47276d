-- Group tiers (007) as PostgreSQL sees them. The proxy applies a user's own row, else the most generous of their
-- groups' rows, else the default '*'; the groups come with each request (the token, or X-User-Groups), so
-- PostgreSQL learns them from the ledger: each record carries the group whose tier set the user's limit (null:
-- their own row or the default), usage_users keeps the one of each user's latest record, and the users page,
-- budget_status and the alert check judge a user without a row of their own by that group's row while it
-- exists, else by the default.

alter table usage_records add column if not exists budget_group text;

-- last_at: the time of the user's latest record, which says whose tenant and tier usage_users holds.
alter table usage_users add column if not exists budget_group text;
alter table usage_users add column if not exists last_at timestamptz;
-- Users seen before: their latest record's time (one probe of usage_records_user_time per partition each).
update usage_users u set last_at = (select max(r.created_at) from usage_records r where r.user_id = u.user_id)
where u.last_at is null;

-- As in 010_admin.sql, with the users' latest record's tier and time; then written into the triggers again (012).
create or replace function quota_rollup_sql(rows_sql text, sign int) returns setof text
language plpgsql immutable as $$
begin
    -- Sorted, so concurrent writers lock rollup rows in one order (no deadlocks between batches).
    return next format($q$
        insert into usage_user_day as t (day, user_id, tenant_id, requests, blocked, tokens, counted, cost_usd)
        select (created_at at time zone 'UTC')::date, user_id, coalesce(tenant_id, ''),
               %1$s * count(*), %1$s * count(*) filter (where status = 'blocked'),
               %1$s * coalesce(sum(total_tokens), 0), %1$s * coalesce(sum(total_tokens) filter (where not exempt), 0),
               %1$s * sum(cost_usd)
        from %2$s group by 1, 2, 3 order by 1, 2, 3
        on conflict (day, user_id, tenant_id) do update
        set requests = t.requests + excluded.requests, blocked = t.blocked + excluded.blocked,
            tokens = t.tokens + excluded.tokens, counted = t.counted + excluded.counted,
            cost_usd = case when t.cost_usd is null and excluded.cost_usd is null then null
                            else coalesce(t.cost_usd, 0) + coalesce(excluded.cost_usd, 0) end
    $q$, sign, rows_sql);
    return next format($q$
        insert into usage_user_month as t (month, user_id, tenant_id, requests, blocked, tokens, counted, cost_usd)
        select date_trunc('month', created_at at time zone 'UTC')::date, user_id, coalesce(tenant_id, ''),
               %1$s * count(*), %1$s * count(*) filter (where status = 'blocked'),
               %1$s * coalesce(sum(total_tokens), 0), %1$s * coalesce(sum(total_tokens) filter (where not exempt), 0),
               %1$s * sum(cost_usd)
        from %2$s group by 1, 2, 3 order by 1, 2, 3
        on conflict (month, user_id, tenant_id) do update
        set requests = t.requests + excluded.requests, blocked = t.blocked + excluded.blocked,
            tokens = t.tokens + excluded.tokens, counted = t.counted + excluded.counted,
            cost_usd = case when t.cost_usd is null and excluded.cost_usd is null then null
                            else coalesce(t.cost_usd, 0) + coalesce(excluded.cost_usd, 0) end
    $q$, sign, rows_sql);
    return next format($q$
        insert into usage_model_day as t (day, model, requests, blocked, prompt_tokens, completion_tokens, tokens,
                                          cost_usd)
        select (created_at at time zone 'UTC')::date, coalesce(model, ''),
               %1$s * count(*), %1$s * count(*) filter (where status = 'blocked'),
               %1$s * coalesce(sum(prompt_tokens), 0), %1$s * coalesce(sum(completion_tokens), 0),
               %1$s * coalesce(sum(total_tokens), 0), %1$s * sum(cost_usd)
        from %2$s group by 1, 2 order by 1, 2
        on conflict (day, model) do update
        set requests = t.requests + excluded.requests, blocked = t.blocked + excluded.blocked,
            prompt_tokens = t.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = t.completion_tokens + excluded.completion_tokens,
            tokens = t.tokens + excluded.tokens,
            cost_usd = case when t.cost_usd is null and excluded.cost_usd is null then null
                            else coalesce(t.cost_usd, 0) + coalesce(excluded.cost_usd, 0) end
    $q$, sign, rows_sql);
    if sign > 0 then
        -- The tenant and the tier (budget_group) are those of the user's latest record: last_at is its time, and
        -- a batch whose latest record is older than that (another writer's, one written late) changes neither.
        -- (A record redelivered after a crash is not in the batch at all: only rows really inserted are.)
        return next format($q$
            insert into usage_users as t (user_id, tenant_id, first_day, last_day, budget_group, last_at)
            select distinct on (user_id) user_id, coalesce(tenant_id, ''), min(d) over w, max(d) over w,
                   budget_group, created_at
            from (select user_id, tenant_id, budget_group, created_at, (created_at at time zone 'UTC')::date as d
                  from %1$s) r
            window w as (partition by user_id)
            order by user_id, created_at desc
            on conflict (user_id) do update
            set first_day = least(t.first_day, excluded.first_day), last_day = greatest(t.last_day, excluded.last_day),
                tenant_id = case when t.last_at > excluded.last_at then t.tenant_id else excluded.tenant_id end,
                budget_group = case when t.last_at > excluded.last_at then t.budget_group else excluded.budget_group end,
                last_at = greatest(t.last_at, excluded.last_at)
            where t.last_at is null or t.last_at <= excluded.last_at or t.first_day > excluded.first_day
        $q$, rows_sql);
    end if;
end
$$;

select quota_rollup_compile();

-- As in 008_rollover.sql, with the tiers: is_default is true only when the '*' row applies, and budget_group
-- names the group whose row does.
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
           coalesce(b.period, d.period, g.period) as period,  -- a tier keeps the default's period, as the proxy does
           coalesce(b.token_limit, g.token_limit, d.token_limit) as base_limit,
           coalesce(b.warn_ratio, g.warn_ratio, d.warn_ratio) as warn_ratio,
           b.subject is null and g.subject is null as is_default,
           g.subject as budget_group
    from subjects s
    left join budgets b on b.subject_type = s.subject_type and b.subject = s.subject
    left join usage_users u on s.subject_type = 'user' and b.subject is null and u.user_id = s.subject
    left join budgets g on g.subject_type = 'group' and g.subject = u.budget_group
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
       is_default, period_start, resets_at, granted, budget_group
from spent;

-- As in 012_cached_plans.sql, with the tiers: a user without a row of their own is judged by the row of the
-- group of their latest record (its thresholds too) while it exists, else by the default.
create or replace function quota_alert_detect(
    types text[], subjects text[], default_thresholds double precision[], now_at timestamptz,
    channels text[], targets text[]
) returns bigint
language plpgsql as $$
declare
    crossings bigint;  -- not `found`: PL/pgSQL's own FOUND
begin
    with batch as (
        select distinct t as subject_type, s as subject from unnest(types, subjects) as b(t, s)
    ),
    limits as (
        select b.subject_type, b.subject,
               coalesce(o.period, d.period, g.period) as period,
               coalesce(o.token_limit, g.token_limit, d.token_limit) as base_limit,
               coalesce(o.alert_thresholds, g.alert_thresholds, d.alert_thresholds, default_thresholds) as thresholds,
               quota_period_start(coalesce(o.period, d.period, g.period), now_at) as period_start,
               quota_period_end(coalesce(o.period, d.period, g.period), now_at) as resets_at
        from batch b
        left join budgets o on o.subject_type = b.subject_type and o.subject = b.subject
        -- A user without a row of their own: the tier of their latest record, while its group row exists.
        left join usage_users u on b.subject_type = 'user' and o.subject is null and u.user_id = b.subject
        left join budgets g on g.subject_type = 'group' and g.subject = u.budget_group
        left join budgets d on d.subject_type = b.subject_type and d.subject = '*'
    ),
    unsent as (  -- the thresholds not yet notified this period: a subject past all of them costs no sum
        select r.*, (r.period_start at time zone 'UTC')::date as first_day,
               coalesce((r.resets_at at time zone 'UTC')::date, 'infinity') as end_day, array(
            select t from unnest(r.thresholds) as t
            where not exists (select 1 from alert_outbox x
                              where x.subject_type = r.subject_type and x.subject = r.subject
                                and x.threshold = t and x.period_start = r.period_start)) as thresholds_open
        from limits r
        where r.base_limit is not null
    ),
    spent as materialized (  -- each subject once, not once per threshold
        select o.*,
               o.base_limit
             + coalesce((select sum(g.tokens) from budget_grants g
                         where g.subject_type = o.subject_type and g.subject = o.subject and g.revoked_at is null
                           and g.period_start = o.period_start), 0)::bigint
             + coalesce((select c.carried from budget_rollover c
                         where c.subject_type = o.subject_type and c.subject = o.subject
                           and c.period_start = o.period_start), 0)::bigint as token_limit,
               coalesce(case o.subject_type  -- two sums, so each uses its index of usage_user_day
                   when 'user' then (select sum(u.counted) from usage_user_day u
                                     where u.user_id = o.subject and u.day >= o.first_day and u.day < o.end_day)
                   else (select sum(u.counted) from usage_user_day u
                         where u.tenant_id = o.subject and u.tenant_id <> '' and u.day >= o.first_day and u.day < o.end_day)
               end, 0)::bigint as used
        from unsent o
        where cardinality(o.thresholds_open) > 0
    ),
    crossed as (
        insert into alert_outbox (key, subject_type, subject, threshold, period, period_start, resets_at,
                                  token_limit, used, created_at)
        select md5(concat_ws(chr(31), s.subject_type, s.subject, t::text, s.period,
                             extract(epoch from s.period_start)::text))::uuid::text,
               s.subject_type, s.subject, t, s.period, s.period_start, s.resets_at, s.token_limit, s.used, now_at
        from spent s cross join unnest(s.thresholds_open) as t
        where s.token_limit > 0 and s.used::numeric >= t::numeric * s.token_limit
        on conflict do nothing
        returning id
    ),
    deliveries as (
        insert into alert_deliveries (notification_id, channel, target, next_attempt_at)
        select c.id, ch.channel, ch.target, now_at
        from crossed c cross join unnest(channels, targets) as ch(channel, target)
        returning 1
    )
    select count(*) into crossings from crossed;
    return crossings;
end
$$;
