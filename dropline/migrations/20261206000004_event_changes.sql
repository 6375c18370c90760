-- An event's changes travel on the outbox like an order's: the host's
-- change of capacity (stock added mid-sale, or never-sold stock taken
-- back), of the date (a reschedule), of the cancellation policy, a pause
-- or resume of the sale, and the event's cancellation, written by the database itself in
-- the transaction that makes them, whoever makes them (the admin API, an
-- operator's UPDATE). An update that moves neither writes nothing.
ALTER TABLE outbox
    ADD COLUMN capacity INT UNSIGNED NULL,
    ADD COLUMN starts_at DATETIME(3) NULL;

-- When the admin API last changed the event: each ingress re-reads the
-- events changed lately into its snapshot, which otherwise reads only new
-- ones.
-- paused_at: since when the host has paused the sale (none while it runs).
-- cancelled_at: when the host cancelled the event (its sale then stops for
-- good, every hold is released and every paid order refunded).
-- The cancellation policy: until when a buyer may cancel a paid order
-- (none: never), and the share of its price refunded then.
ALTER TABLE events
    ADD COLUMN changed_at DATETIME(3) NULL,
    ADD COLUMN paused_at DATETIME(3) NULL,
    ADD COLUMN cancel_paid_until DATETIME(3) NULL,
    ADD COLUMN cancel_refund_percent TINYINT UNSIGNED NOT NULL DEFAULT 100,
    ADD COLUMN cancelled_at DATETIME(3) NULL,
    ADD KEY events_by_change (changed_at);

CREATE TRIGGER events_to_outbox_on_update AFTER UPDATE ON events FOR EACH ROW
BEGIN
    IF NEW.capacity <> OLD.capacity THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, capacity, starts_at, changed_at)
        VALUES (UUID(), 'event', 'capacity_changed', NEW.id, NEW.capacity, NEW.starts_at, UTC_TIMESTAMP(3));
    END IF;
    IF NEW.starts_at <> OLD.starts_at THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, capacity, starts_at, changed_at)
        VALUES (UUID(), 'event', 'rescheduled', NEW.id, NEW.capacity, NEW.starts_at, UTC_TIMESTAMP(3));
    END IF;
    IF NOT (OLD.cancel_paid_until <=> NEW.cancel_paid_until)
       OR OLD.cancel_refund_percent <> NEW.cancel_refund_percent THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, capacity, starts_at, changed_at)
        VALUES (UUID(), 'event', 'policy_changed', NEW.id, NEW.capacity, NEW.starts_at, UTC_TIMESTAMP(3));
    END IF;
    IF OLD.cancelled_at IS NULL AND NEW.cancelled_at IS NOT NULL THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, capacity, starts_at, changed_at)
        VALUES (UUID(), 'event', 'cancelled', NEW.id, NEW.capacity, NEW.starts_at, UTC_TIMESTAMP(3));
    END IF;
    IF (OLD.paused_at IS NULL) <> (NEW.paused_at IS NULL) THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, capacity, starts_at, changed_at)
        VALUES (UUID(), 'event', IF(NEW.paused_at IS NULL, 'resumed', 'paused'), NEW.id, NEW.capacity,
                NEW.starts_at, UTC_TIMESTAMP(3));
    END IF;
END;
