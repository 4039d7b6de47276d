-- request_id is the proxy's own random id (the reservation's and the record's key); the caller's
-- X-Request-Id, if it sent one, is kept beside it as a label it can search by.
alter table usage_records add column if not exists client_request_id text;
create index if not exists usage_records_client_request on usage_records (client_request_id) where client_request_id is not null;
