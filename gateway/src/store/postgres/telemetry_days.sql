-- 3: telemetry partitioned by the UTC day of its sample time, so that retention drops whole
-- days instead of running one large DELETE. A sample outside every day partition (far past,
-- far future) lands in telemetry_default. gridsense_telemetry_days(now, keep_from) makes the
-- days from the oldest sample waiting in the default partition (not before keep_from, or
-- 400 days back when it is NULL) to two days after now, moving their rows out of the default
-- partition, and drops the days that end
-- at or before keep_from: it runs as the role that migrated (SECURITY DEFINER), so the runtime
-- role needs no DDL right. Returns the rows it removed.
ALTER TABLE telemetry RENAME TO telemetry_v2;
ALTER TABLE telemetry_v2 RENAME CONSTRAINT telemetry_pkey TO telemetry_v2_pkey;
ALTER INDEX telemetry_time RENAME TO telemetry_v2_time;
CREATE TABLE telemetry (
    eui BIGINT NOT NULL,
    measurement TEXT NOT NULL,
    field TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    grid_code TEXT,
    PRIMARY KEY (eui, measurement, field, at_ms)
) PARTITION BY RANGE (at_ms);
-- No index on at_ms: retention drops partitions, and a device's recent samples are found by
-- the primary key (eui first) within the partitions their time range leaves.
CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
INSERT INTO telemetry SELECT eui, measurement, field, at_ms, value, grid_code FROM telemetry_v2;
DROP TABLE telemetry_v2;

CREATE FUNCTION gridsense_telemetry_days(now_ms BIGINT, keep_from_ms BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    day_ms CONSTANT BIGINT := 86400000;
    first_day BIGINT;
    d BIGINT;
    part TEXT;
    n BIGINT;
    removed BIGINT := 0;
BEGIN
    -- One at a time: several gateways may share the database.
    PERFORM pg_advisory_xact_lock(hashtext('gridsense_telemetry_days'));
    -- From the oldest sample waiting in the default partition (today when none), but not
    -- before keep_from (or 400 days back): past days with nothing to hold are not made.
    SELECT min(at_ms) / day_ms INTO first_day FROM telemetry_default;
    first_day := LEAST(COALESCE(first_day, now_ms / day_ms), now_ms / day_ms);
    first_day := GREATEST(first_day, COALESCE(keep_from_ms, now_ms - 400 * day_ms) / day_ms);
    FOR d IN first_day .. now_ms / day_ms + 2 LOOP
        part := 'telemetry_' || to_char(to_timestamp(d * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE telemetry INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format('WITH moved AS (DELETE FROM telemetry_default WHERE at_ms >= $1 AND at_ms < $2 RETURNING *)
            INSERT INTO %I SELECT * FROM moved', part) USING d * day_ms, (d + 1) * day_ms;
        EXECUTE format('ALTER TABLE telemetry ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
            part, d * day_ms, (d + 1) * day_ms);
    END LOOP;
    IF keep_from_ms IS NOT NULL THEN
        FOR part IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'telemetry'::regclass AND c.relname ~ '^telemetry_[0-9]{8}$'
        LOOP
            CONTINUE WHEN extract(epoch FROM to_date(substr(part, 11), 'YYYYMMDD'))::BIGINT * 1000
                + day_ms > keep_from_ms;
            EXECUTE format('SELECT count(*) FROM %I', part) INTO n;
            removed := removed + n;
            EXECUTE format('ALTER TABLE telemetry DETACH PARTITION %I', part);
            EXECUTE format('DROP TABLE %I', part);
        END LOOP;
        DELETE FROM telemetry_default WHERE at_ms < keep_from_ms;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END IF;
    RETURN removed;
END $$;
SELECT gridsense_telemetry_days((extract(epoch FROM now()) * 1000)::BIGINT, NULL);
