-- The oversell allowance (design note 002): units beyond the venue's
-- capacity that the host accepts to sell, counting on no-shows. The ledger
-- numbers units 1 to capacity + oversell_allowance, and every count keeps
-- the two apart: what went beyond the capacity is visible as oversold.
--
-- The sale's milestones, as the record sees them: opened_at when its sale
-- opened, sold_out_at while every unit it may sell (capacity plus
-- allowance) is paid for. The settlers set them (settler/src/milestones.rs)
-- and this trigger announces each move, like every other change of the
-- event: opened, sold_out, and back_on_sale when a paid order's cancel or
-- more stock makes units available again.
--
-- MySQL has no CREATE OR REPLACE TRIGGER: upgrade to this migration with
-- no settler running (see the README).
ALTER TABLE events
    ADD COLUMN oversell_allowance INT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN opened_at DATETIME(3) NULL,
    ADD COLUMN sold_out_at DATETIME(3) NULL,
    ADD KEY events_to_open (opened_at, sale_opens_at);

ALTER TABLE outbox ADD COLUMN oversell_allowance INT UNSIGNED NULL;

-- Sales that opened before this migration opened then: no change now.
UPDATE events SET opened_at = sale_opens_at WHERE sale_opens_at <= UTC_TIMESTAMP(3);

-- One row per change the update made, in a fixed order, each with the
-- event as the update left it. A reschedule and a cancel are also told to
-- every ticket holder (each live order's buyer), as one row per order: the
-- relay publishes it under the order's key, in order with the order's own
-- changes, and the notifier sends it to the host naming the buyer.
DROP TRIGGER IF EXISTS events_to_outbox_on_update;
CREATE TRIGGER events_to_outbox_on_update AFTER UPDATE ON events FOR EACH ROW
BEGIN
    INSERT INTO outbox (change_id, subject, kind, event_id, capacity, oversell_allowance, starts_at, changed_at)
    SELECT UUID(), 'event', moved.kind, NEW.id, NEW.capacity, NEW.oversell_allowance, NEW.starts_at,
           UTC_TIMESTAMP(3)
    FROM (
        SELECT 1 AS n, 'opened' AS kind, OLD.opened_at IS NULL AND NEW.opened_at IS NOT NULL AS happened
        UNION ALL SELECT 2, 'capacity_changed',
            NEW.capacity <> OLD.capacity OR NEW.oversell_allowance <> OLD.oversell_allowance
        UNION ALL SELECT 3, 'rescheduled', NEW.starts_at <> OLD.starts_at
        UNION ALL SELECT 4, 'policy_changed',
            NOT (OLD.cancel_paid_until <=> NEW.cancel_paid_until)
            OR OLD.cancel_refund_percent <> NEW.cancel_refund_percent
        UNION ALL SELECT 5, IF(NEW.paused_at IS NULL, 'resumed', 'paused'),
            (OLD.paused_at IS NULL) <> (NEW.paused_at IS NULL)
        UNION ALL SELECT 6, IF(NEW.sold_out_at IS NULL, 'back_on_sale', 'sold_out'),
            (OLD.sold_out_at IS NULL) <> (NEW.sold_out_at IS NULL)
        UNION ALL SELECT 7, 'cancelled', OLD.cancelled_at IS NULL AND NEW.cancelled_at IS NOT NULL
    ) AS moved
    WHERE moved.happened
    ORDER BY moved.n;
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        capacity, oversell_allowance, starts_at, changed_at)
    SELECT UUID(), 'event', moved.kind, NEW.id, o.order_id, o.user_id, o.quantity, o.amount_cents, o.expires_at,
           NEW.capacity, NEW.oversell_allowance, NEW.starts_at, UTC_TIMESTAMP(3)
    FROM (
        SELECT 1 AS n, 'rescheduled' AS kind, NEW.starts_at <> OLD.starts_at AS happened
        UNION ALL SELECT 2, 'cancelled', OLD.cancelled_at IS NULL AND NEW.cancelled_at IS NOT NULL
    ) AS moved
    JOIN orders o ON o.event_id = NEW.id AND o.state IN ('held', 'paid')
    WHERE moved.happened
    ORDER BY moved.n, o.order_id;
END;

-- A holder the record learns of only after a reschedule or a cancel of the
-- event (a hold decided before it, still on its way from the ledger when the
-- change committed) is told of its latest one too, once, right after its
-- hold. Every hold of a cancelled event was decided before the cancel (the
-- ledger stops selling first), even one whose end reached the record before
-- its decision (its created_at is then its end's time). The read of the event's changes feeds an insert, so it is a locking
-- read and sees a change committed after this transaction began; a change
-- that runs meanwhile reads the orders the same way and waits for this one
-- instead: of the two, exactly one writes the holder's copy.
CREATE TRIGGER orders_told_of_event_changes AFTER INSERT ON orders FOR EACH ROW FOLLOWS orders_to_outbox_on_insert
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        capacity, oversell_allowance, starts_at, changed_at)
    SELECT UUID(), 'event', c.kind, NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity, NEW.amount_cents,
           NEW.expires_at, c.capacity, c.oversell_allowance, c.starts_at, UTC_TIMESTAMP(3)
    FROM outbox c
    WHERE c.event_id = NEW.event_id AND c.subject = 'event' AND c.order_id IS NULL
      AND c.kind IN ('rescheduled', 'cancelled')
      AND (c.kind = 'cancelled' OR c.changed_at > NEW.created_at)
      AND (NEW.state IN ('held', 'paid') OR NEW.updated_at >= c.changed_at)
      AND c.seq = (SELECT MAX(l.seq) FROM outbox l
                   WHERE l.event_id = NEW.event_id AND l.subject = 'event' AND l.order_id IS NULL AND l.kind = c.kind)
    ORDER BY c.seq;
