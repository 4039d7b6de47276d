-- Budget tiers by group: a row of subject_type 'group' applies to users whose token lists the group
-- (JWT_GROUPS_CLAIM) or whose delegate names it (X-User-Groups), unless they have a row of their own;
-- of several groups, the most generous row applies.
alter table budgets drop constraint if exists budgets_subject_type_check;
alter table budgets add constraint budgets_subject_type_check check (subject_type in ('user', 'tenant', 'group'));
