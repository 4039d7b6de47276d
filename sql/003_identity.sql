-- Delegated requests: a trusted service (LibreChat with one service token) names the end user.
-- user_id is the end user charged; via is the service token's subject; user_email as the service sent it.
alter table usage_records add column if not exists via text;
alter table usage_records add column if not exists user_email text;
