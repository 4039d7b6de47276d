-- Budget alerts (docs/alerts.md). The ledger writer finds, after each batch, the subjects of the batch that
-- crossed a threshold this period and writes one row per (subject, threshold, period) into alert_outbox; the
-- notifier sends each row once per channel (alert_deliveries), retrying with back-off. Both are in
-- PostgreSQL, so nothing is lost or sent twice across restarts, and several writers and notifiers can run.

-- A budget row's own thresholds (fractions of its limit); null: ALERT_THRESHOLDS; empty: no alerts.
alter table budgets add column if not exists alert_thresholds double precision[]
    check (alert_thresholds is null or (
        coalesce(array_ndims(alert_thresholds), 1) = 1 and cardinality(alert_thresholds) <= 10
        and array_position(alert_thresholds, null) is null
        and 0 < all(alert_thresholds) and 1 >= all(alert_thresholds)));

-- One row per crossing. The unique key is what makes it exactly one, whichever writer sees it first.
create table if not exists alert_outbox (
    id           bigserial   primary key,
    key          text        not null unique,   -- the idempotency key: Idempotency-Key header, payload's "id"
    subject_type text        not null check (subject_type in ('user', 'tenant')),
    subject      text        not null,
    threshold    double precision not null,
    period       text        not null,
    period_start timestamptz not null,
    resets_at    timestamptz,                   -- null for 'total' budgets
    token_limit  bigint      not null,          -- the effective limit when it was crossed (grants and carry in)
    used         bigint      not null,          -- used this period when the crossing was found
    created_at   timestamptz not null default now(),
    unique (subject_type, subject, threshold, period_start)
);
create index if not exists alert_outbox_created on alert_outbox (created_at);

-- One row per notification and channel: a channel that fails does not make the others send again.
-- target tells apart the URLs of ALERT_WEBHOOK_URLS (their host and a digest of the whole URL, which may
-- hold a secret); it is '' for the one Slack channel.
create table if not exists alert_deliveries (
    notification_id bigint      not null references alert_outbox (id) on delete cascade,
    channel         text        not null check (channel in ('webhook', 'slack', 'email')),
    target          text        not null default '',
    state           text        not null default 'pending' check (state in ('pending', 'sent', 'failed')),
    attempts        integer     not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    sent_at         timestamptz,
    primary key (notification_id, channel, target)
);
create index if not exists alert_deliveries_due on alert_deliveries (next_attempt_at) where state = 'pending';

-- The crossings of the subjects (types[i], subjects[i]) at `now_at`, written to the outbox with a delivery for
-- each configured channel (channels[j], targets[j]). Judged as budget_status judges: the subject's own row
-- else its '*' default, the period's grants and carry in, exempt requests out. The use is summed from the daily
-- rollup usage_user_day (010), kept exact by triggers as the ledger is written: at most 31 rows per user, where
-- summing the records themselves after every batch took hundreds of milliseconds for a tenant of 200,000.
-- Returns the rows added.
create or replace function quota_alert_detect(
    types text[], subjects text[], default_thresholds double precision[], now_at timestamptz,
    channels text[], targets text[]
) returns bigint
language sql as $$
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
select count(*) from crossed
$$;

-- For admins: every notification with each of its deliveries ('recorded' when no channel was configured).
create or replace view alert_notifications as
select o.id, o.key, o.subject_type, o.subject, o.threshold, o.period, o.period_start, o.resets_at,
       o.token_limit, o.used, o.created_at as crossed_at,
       d.channel, d.target, coalesce(d.state, 'recorded') as state, d.attempts, d.next_attempt_at,
       d.sent_at, d.last_error
from alert_outbox o
left join alert_deliveries d on d.notification_id = o.id;
