-- The outbox: every change of an order, written by the database itself in
-- the transaction that makes the change, whoever makes it (the settler's
-- batches, the reconciler, an operator's UPDATE). The settler's relay
-- publishes the rows on the `changes` topic in `seq` order and marks them
-- published; the notifier turns each into one webhook. A change is a row
-- here exactly when the state moved: an upsert that changes nothing (a
-- redelivered message) writes none.
--
-- Triggers need the TRIGGER privilege, and on a MySQL server with binary
-- logging either SUPER or log_bin_trust_function_creators = 1 (see the
-- README's production notes).
CREATE TABLE IF NOT EXISTS outbox (
    seq           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The id a receiver deduplicates on; unique whatever the retries.
    change_id     CHAR(36) CHARACTER SET ascii NOT NULL,
    subject       ENUM('order', 'event') NOT NULL,
    kind          VARCHAR(32)     NOT NULL,
    event_id      BIGINT UNSIGNED NOT NULL,
    order_id      CHAR(36) CHARACTER SET ascii NULL,
    user_id       VARCHAR(128)    NULL,
    quantity      INT UNSIGNED    NULL,
    amount_cents  BIGINT UNSIGNED NULL,
    expires_at    DATETIME(3)     NULL,
    changed_at    DATETIME(3)     NOT NULL,
    published_at  DATETIME(3)     NULL,
    UNIQUE KEY outbox_by_change (change_id),
    KEY outbox_unpublished (published_at, seq),
    KEY outbox_by_event (event_id, subject),
    KEY outbox_by_order (order_id, kind)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A new order: every order starts as a hold, so its hold is a change even
-- when the order reaches the record already ended (its payment or cancel
-- was written before its decision): then both, the hold first.
CREATE TRIGGER orders_to_outbox_on_insert AFTER INSERT ON orders FOR EACH ROW
BEGIN
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        changed_at)
    VALUES (UUID(), 'order', 'held', NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity, NEW.amount_cents,
            NEW.expires_at, NEW.created_at);
    IF NEW.state <> 'held' THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at)
        VALUES (UUID(), 'order', NEW.state, NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity,
                NEW.amount_cents, NEW.expires_at, NEW.updated_at);
    END IF;
END;

-- A state that moved; an update that leaves the state as it was writes
-- nothing.
CREATE TRIGGER orders_to_outbox_on_update AFTER UPDATE ON orders FOR EACH ROW
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        changed_at)
    SELECT UUID(), 'order', NEW.state, NEW.event_id, NEW.order_id, NEW.user_id, NEW.quantity, NEW.amount_cents,
           NEW.expires_at, NEW.updated_at
    FROM DUAL WHERE NEW.state <> OLD.state;

-- What the notifier did with each change (and each reminder): delivered,
-- or given up on and dead-lettered. One row per webhook id, so a change
-- redelivered to the notifier is never announced twice once recorded.
CREATE TABLE IF NOT EXISTS notifications (
    notification_id  CHAR(36) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    kind             VARCHAR(40)     NOT NULL,
    event_id         BIGINT UNSIGNED NOT NULL,
    order_id         CHAR(36) CHARACTER SET ascii NULL,
    outcome          ENUM('delivered', 'dead_lettered') NOT NULL,
    attempts         INT UNSIGNED    NOT NULL,
    last_error       VARCHAR(255)    NULL,
    recorded_at      DATETIME(3)     NOT NULL,
    KEY notifications_by_event (event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A reminder to send shortly before a hold's deadline, if it is still held
-- then. Written by the notifier when it announces the hold.
CREATE TABLE IF NOT EXISTS reminders (
    order_id         CHAR(36) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    notification_id  CHAR(36) CHARACTER SET ascii NOT NULL,
    event_id         BIGINT UNSIGNED NOT NULL,
    due_at           DATETIME(3)     NOT NULL,
    -- Set once sent, dead-lettered, or found needless (the hold had ended).
    done_at          DATETIME(3)     NULL,
    -- Whoever is sending it, until when: another notifier waits that long.
    claimed_until    DATETIME(3)     NULL,
    KEY reminders_due (done_at, due_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
