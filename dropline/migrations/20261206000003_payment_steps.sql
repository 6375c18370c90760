-- The steps of paying before the payment itself: the buyer started paying
-- (which extends the hold once, see hold.lua's 'start'), and the provider
-- declined an attempt (the hold stays held until its deadline, so the buyer
-- can try again). Both are changes on the outbox, like every order change.

-- When the buyer started paying: set once, on the hold's one extension.
-- A rebuild of the ledger reads it back, so the extension stays spent.
ALTER TABLE orders ADD COLUMN payment_started_at DATETIME(3) NULL;

-- One row per declined attempt, keyed by the provider's webhook event id:
-- a redelivered webhook (or Kafka message) writes nothing more.
CREATE TABLE IF NOT EXISTS payment_failures (
    provider_event_id  VARCHAR(128)    NOT NULL PRIMARY KEY,
    payment_id         VARCHAR(128)    NOT NULL,
    order_id           CHAR(36) CHARACTER SET ascii NOT NULL,
    event_id           BIGINT UNSIGNED NOT NULL,
    reason             VARCHAR(255)    NOT NULL,
    failed_at          DATETIME(3)     NOT NULL,
    KEY payment_failures_by_order (order_id),
    KEY payment_failures_by_event (event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A payment step's change names the step's own id (the failure's provider
-- event id; the payment id for a start) and, for a failure, its reason.
ALTER TABLE outbox
    MODIFY subject ENUM('order', 'event', 'refund', 'payment') NOT NULL,
    ADD COLUMN step_id VARCHAR(128) NULL,
    ADD COLUMN reason VARCHAR(255) NULL;

-- The order triggers again, now with the start of payment: on a new row
-- the hold comes first, then the start, then a final state; on an update
-- the start comes before a state it moved to in the same write.
DROP TRIGGER IF EXISTS orders_to_outbox_on_insert;
CREATE TRIGGER orders_to_outbox_on_insert AFTER INSERT ON orders FOR EACH ROW
BEGIN
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        changed_at)
    VALUES (UUID(), 'order', 'held', NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity, NEW.amount_cents,
            NEW.expires_at, NEW.created_at);
    IF NEW.payment_started_at IS NOT NULL THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at)
        VALUES (UUID(), 'payment', 'payment_started', NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity,
                NEW.amount_cents, NEW.expires_at, NEW.payment_started_at);
    END IF;
    IF NEW.state <> 'held' THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at)
        VALUES (UUID(), 'order', NEW.state, NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity,
                NEW.amount_cents, NEW.expires_at, NEW.updated_at);
    END IF;
END;

DROP TRIGGER IF EXISTS orders_to_outbox_on_update;
CREATE TRIGGER orders_to_outbox_on_update AFTER UPDATE ON orders FOR EACH ROW
BEGIN
    IF OLD.payment_started_at IS NULL AND NEW.payment_started_at IS NOT NULL THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at)
        VALUES (UUID(), 'payment', 'payment_started', NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity,
                NEW.amount_cents, NEW.expires_at, NEW.payment_started_at);
    END IF;
    IF NEW.state <> OLD.state THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at)
        VALUES (UUID(), 'order', NEW.state, NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity,
                NEW.amount_cents, NEW.expires_at, NEW.updated_at);
    END IF;
END;

CREATE TRIGGER payment_failures_to_outbox AFTER INSERT ON payment_failures FOR EACH ROW
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        changed_at, payment_id, step_id, reason)
    SELECT UUID(), 'payment', 'payment_failed', o.event_id, NEW.order_id, o.user_id, o.quantity, o.amount_cents,
           o.expires_at, NEW.failed_at, NEW.payment_id, NEW.provider_event_id, NEW.reason
    FROM orders o WHERE o.order_id = NEW.order_id;
