-- Usage ledger and budgets. Applied once by `python -m proxy migrate` (tracked in schema_migrations).

-- One row per proxied request. Range-partitioned by month so old months can be detached or dropped
-- cheaply and the current month's indexes stay small. request_id is the idempotency key: the writer
-- inserts with ON CONFLICT DO NOTHING, so redelivery after a crash never double-counts.
create table if not exists usage_records (
    request_id        text        not null,
    created_at        timestamptz not null,
    user_id           text        not null,
    tenant_id         text,
    model             text,
    served_model      text,
    endpoint          text        not null,
    prompt_tokens     integer     not null default 0,
    completion_tokens integer     not null default 0,
    total_tokens      integer     not null default 0,
    cost_usd          numeric(14, 8),
    status            text        not null,   -- ok | blocked | rate_limited | upstream_error | cancelled | invalid | unavailable | error
    http_status       integer,
    stream            boolean     not null default false,
    estimated         boolean     not null default false,
    latency_ms        real,
    ttft_ms           real,
    primary key (request_id, created_at)
) partition by range (created_at);

create index if not exists usage_records_user_time on usage_records (user_id, created_at);
create index if not exists usage_records_tenant_time on usage_records (tenant_id, created_at) where tenant_id is not null;
create index if not exists usage_records_status_time on usage_records (status, created_at) where status <> 'ok';

-- Budgets are data. subject '*' is the default for its subject_type; the proxy writes the
-- default user (and tenant) row from DEFAULT_TOKEN_BUDGET / BUDGET_PERIOD / WARN_RATIO.
create table if not exists budgets (
    subject_type text        not null check (subject_type in ('user', 'tenant')),
    subject      text        not null,
    period       text        not null default 'month' check (period in ('day', 'week', 'month', 'total')),
    token_limit  bigint      not null check (token_limit >= 0),
    warn_ratio   double precision not null default 0.8 check (warn_ratio > 0 and warn_ratio <= 1),
    rpm_limit    integer,
    tpm_limit    integer,
    updated_at   timestamptz not null default now(),
    primary key (subject_type, subject)
);

-- Period arithmetic in UTC, the same as proxy/budget/rows.py (period_bounds): weeks start on Monday, 'total' never resets.
create or replace function quota_period_start(period text, at timestamptz) returns timestamptz
language sql immutable as $$
    select case period
        when 'total' then '-infinity'::timestamptz
        else date_trunc(period, at at time zone 'UTC') at time zone 'UTC'
    end
$$;

create or replace function quota_period_end(period text, at timestamptz) returns timestamptz
language sql immutable as $$
    select case period
        when 'total' then 'infinity'::timestamptz
        else quota_period_start(period, at) + ('1 ' || period)::interval
    end
$$;

-- Creates the month partition holding `at`; safe to race from several writers.
create or replace function quota_ensure_partition(at timestamptz) returns void
language plpgsql as $$
declare
    lo timestamptz := date_trunc('month', at at time zone 'UTC') at time zone 'UTC';
    name text := 'usage_records_' || to_char(lo at time zone 'UTC', 'YYYYMM');
begin
    if to_regclass(name) is null then
        execute format(
            'create table if not exists %I partition of usage_records for values from (%L) to (%L)',
            name, lo, lo + interval '1 month');
    end if;
exception when duplicate_table or unique_violation then
    null;
end
$$;

select quota_ensure_partition(now() + make_interval(months => m)) from generate_series(-1, 2) as m;
