-- Per-model caps inside a budget: "100k a month, of which at most 20k on gpt-4o*". A cap names a glob on
-- the requested model; requests to a matching model are checked against it in the same atomic call as
-- the overall budget. Subject '*' holds the caps of everyone without caps of their own.
create table if not exists budget_model_caps (
    subject_type text        not null check (subject_type in ('user', 'tenant')),
    subject      text        not null,
    model        text        not null check (model <> ''),
    period       text        not null default 'month' check (period in ('day', 'week', 'month', 'total')),
    token_limit  bigint      not null check (token_limit >= 0),
    updated_at   timestamptz not null default now(),
    primary key (subject_type, subject, model)
);
