-- The admin dashboard: a history of budget changes, and daily rollups of usage_records so the overview and
-- the users page read thousands of rows instead of a million.

-- Every change to a budget row or a model cap, by the admin API, the dashboard or `budget set`
-- (proxy/budget/rows.py change_budget): who, when, and the row before and after (null: no row).
create table if not exists budget_changes (
    id           bigserial   primary key,
    subject_type text        not null,
    subject      text        not null,
    model        text        not null default '',  -- a model cap's glob; '' for the budget row itself
    changed_by   text        not null,
    changed_at   timestamptz not null default now(),
    source       text        not null,             -- api | page | cli
    before       jsonb,
    after        jsonb       not null,
    reason       text
);
create index if not exists budget_changes_subject on budget_changes (subject_type, subject, changed_at desc);
create index if not exists budget_changes_time on budget_changes (changed_at desc);

-- Per user and day, and per model and day, what usage_records holds. Kept by statement triggers on
-- usage_records (one aggregate per batch the ledger writes, of the rows it really inserted: a redelivered
-- batch's ON CONFLICT DO NOTHING adds nothing twice), so they are always exactly the sum of the ledger.
-- Days are UTC days, and every budget period starts at a UTC midnight, so a period's use is a sum of days.
-- `counted` leaves exempt requests out, as the budgets do. quota_rollup_rebuild() recomputes days from the
-- ledger (after rows were removed without the triggers: a dropped or detached partition).
create table if not exists usage_user_day (
    day        date    not null,
    user_id    text    not null,
    tenant_id  text    not null default '',  -- '' for none
    requests   bigint  not null default 0,
    blocked    bigint  not null default 0,
    tokens     bigint  not null default 0,
    counted    bigint  not null default 0,
    cost_usd   numeric,
    primary key (day, user_id, tenant_id)
);
create index if not exists usage_user_day_user on usage_user_day (user_id, day);
create index if not exists usage_user_day_tenant on usage_user_day (tenant_id, day) where tenant_id <> '';

-- The same per user and calendar month (UTC): a month's use of 10,000 users is 10,000 rows.
create table if not exists usage_user_month (
    month      date    not null,  -- the first day of the month
    user_id    text    not null,
    tenant_id  text    not null default '',
    requests   bigint  not null default 0,
    blocked    bigint  not null default 0,
    tokens     bigint  not null default 0,
    counted    bigint  not null default 0,
    cost_usd   numeric,
    primary key (month, user_id, tenant_id)
);
create index if not exists usage_user_month_user on usage_user_month (user_id, month);

create table if not exists usage_model_day (
    day               date    not null,
    model             text    not null,  -- '' for none
    requests          bigint  not null default 0,
    blocked           bigint  not null default 0,
    prompt_tokens     bigint  not null default 0,
    completion_tokens bigint  not null default 0,
    tokens            bigint  not null default 0,
    cost_usd          numeric,
    primary key (day, model)
);

-- Every user the ledger has seen, with their (latest) tenant: the users page lists them without a
-- distinct over the ledger. last_day moves at most once per user and day.
create table if not exists usage_users (
    user_id   text not null primary key,
    tenant_id text not null default '',
    first_day date not null,
    last_day  date not null
);
create index if not exists usage_users_tenant on usage_users (tenant_id) where tenant_id <> '';

-- The statements that add `sign` times the rows of `rows_sql` (a transition table, or any relation with
-- usage_records' columns) to the rollups. They are run by the caller: a trigger's transition table is
-- visible in the trigger function only.
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
        return next format($q$
            insert into usage_users as t (user_id, tenant_id, first_day, last_day)
            select distinct on (user_id) user_id, coalesce(tenant_id, ''), min(d) over w, max(d) over w
            from (select user_id, tenant_id, created_at, (created_at at time zone 'UTC')::date as d from %1$s) r
            window w as (partition by user_id)
            order by user_id, created_at desc
            on conflict (user_id) do update
            set first_day = least(t.first_day, excluded.first_day), last_day = excluded.last_day,
                tenant_id = excluded.tenant_id
            where t.last_day < excluded.last_day or t.first_day > excluded.first_day
        $q$, rows_sql);
    end if;
end
$$;

create or replace function quota_rollup_inserted() returns trigger
language plpgsql as $$
declare
    statement text;
begin
    for statement in select quota_rollup_sql('quota_new_rows', 1) loop
        execute statement;
    end loop;
    return null;
end
$$;

create or replace function quota_rollup_deleted() returns trigger
language plpgsql as $$
declare
    statement text;
begin
    for statement in select quota_rollup_sql('quota_old_rows', -1) loop
        execute statement;
    end loop;
    return null;
end
$$;

-- Statement triggers with transition tables (one per event: PostgreSQL allows no more) on the partitioned
-- table see the rows routed to every partition, by INSERT, COPY and INSERT ... ON CONFLICT alike.
-- Creating them locks usage_records until this migration commits, so no insert falls between the
-- backfill below and the triggers.
drop trigger if exists quota_rollup_insert on usage_records;
create trigger quota_rollup_insert after insert on usage_records
    referencing new table as quota_new_rows for each statement execute function quota_rollup_inserted();
drop trigger if exists quota_rollup_delete on usage_records;
create trigger quota_rollup_delete after delete on usage_records
    referencing old table as quota_old_rows for each statement execute function quota_rollup_deleted();

-- TRUNCATE usage_records empties the rollups with it. (Dropping or detaching a partition leaves them as they
-- were: the days stay on the dashboard after their raw records are gone; quota_rollup_rebuild() forgets them.)
create or replace function quota_rollup_truncated() returns trigger
language plpgsql as $$
begin
    truncate usage_user_day, usage_user_month, usage_model_day, usage_users;
    return null;
end
$$;
drop trigger if exists quota_rollup_truncate on usage_records;
create trigger quota_rollup_truncate after truncate on usage_records
    for each statement execute function quota_rollup_truncated();

-- Recompute the months from from_day's to to_day's (whole months, both included) from the ledger:
-- idempotent, for repairs. Returns the user-day rows written.
create or replace function quota_rollup_rebuild(from_day date, to_day date) returns bigint
language plpgsql as $$
declare
    written bigint;
    statement text;
    lo date := date_trunc('month', from_day)::date;
    hi date := (date_trunc('month', to_day) + interval '1 month')::date;
begin
    lock table usage_records in share mode;  -- no insert runs between the delete and the sum
    delete from usage_user_day where day >= lo and day < hi;
    delete from usage_user_month where month >= lo and month < hi;
    delete from usage_model_day where day >= lo and day < hi;
    for statement in select quota_rollup_sql(format(
        '(select * from usage_records where created_at >= %L and created_at < %L) rebuilt',
        lo::timestamp at time zone 'UTC', hi::timestamp at time zone 'UTC'), 1) loop
        execute statement;
    end loop;
    select count(*) into written from usage_user_day where day >= lo and day < hi;
    return written;
end
$$;

-- The ledger as it stands when this migration runs.
select quota_rollup_rebuild('-infinity', 'infinity');
