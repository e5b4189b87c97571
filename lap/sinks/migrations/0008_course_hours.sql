-- Course activity per UTC hour instead of per hour of the week over all time, so that the
-- heat map's hour-of-week figures cover the window asked for. The old table's counts have no
-- dates and cannot be carried over: courses' hours fill again from new events (before any
-- release, so no deployment loses figures it had).
CREATE TABLE course_hours (
    tenant text        NOT NULL,
    course text        NOT NULL,
    hour   timestamptz NOT NULL,
    events bigint      NOT NULL,
    PRIMARY KEY (tenant, course, hour)
);
DROP TABLE course_hours_of_week;
