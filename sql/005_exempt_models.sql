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

-- budget_status leaves exempt requests out too: it is redefined, with grants and rollover, in 008_rollover.sql.
