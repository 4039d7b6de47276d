-- Statements PostgreSQL plans once per session instead of once per ledger batch (#19). A batch's fixed cost
-- was mostly planning: the rollup triggers ran their statements by EXECUTE, and quota_alert_detect, a SQL
-- function with data-modifying CTEs, was planned on every call. PL/pgSQL keeps the plans of its static
-- statements: at 25 records a batch, PostgreSQL's CPU per record fell from ~135 to ~60 µs (docs/performance.md).

-- The rollup triggers with quota_rollup_sql's statements written in. A later change to quota_rollup_sql
-- runs `select quota_rollup_compile()` again.
create or replace function quota_rollup_compile() returns void
language plpgsql as $$
declare
    trigger_function text;
    rows_table text;
    sign int;
    body text;
begin
    for trigger_function, rows_table, sign in
        values ('quota_rollup_inserted', 'quota_new_rows', 1), ('quota_rollup_deleted', 'quota_old_rows', -1)
    loop
        select string_agg(statement, E';\n') into body from quota_rollup_sql(rows_table, sign) as statement;
        execute format(
            'create or replace function %I() returns trigger language plpgsql as %L',
            trigger_function, format(E'begin\n%s;\nreturn null;\nend', body)
        );
    end loop;
end
$$;
select quota_rollup_compile();

-- As in 011_alerts.sql, in PL/pgSQL.
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
               coalesce(o.period, d.period) as period,
               coalesce(o.token_limit, d.token_limit) as base_limit,
               coalesce(o.alert_thresholds, d.alert_thresholds, default_thresholds) as thresholds,
               quota_period_start(coalesce(o.period, d.period), now_at) as period_start,
               quota_period_end(coalesce(o.period, d.period), now_at) as resets_at
        from batch b
        left join budgets o on o.subject_type = b.subject_type and o.subject = b.subject
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
