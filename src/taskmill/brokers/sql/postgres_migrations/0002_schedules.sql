-- Periodic schedules: the latest tick each schedule enqueued (epoch seconds). Schedulers read
-- it to know what they missed; it only moves forward (greatest()). A tick's job is unique by
-- its id, so this table is a cursor, not the guard against running a tick twice.

CREATE TABLE {schema}.schedules (
    name      text             PRIMARY KEY,
    last_tick double precision NOT NULL
);
