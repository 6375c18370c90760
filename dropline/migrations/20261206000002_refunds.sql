-- Refunds that go back through the payment provider.
--
-- A payment the record keeps as refund_required (it came after its hold
-- ended, did not match its order, or paid a hold the record voided) gets
-- one refund row here, in the same transaction, whoever wrote it: the
-- triggers below. The settlers' refund worker then asks the provider for
-- it, with the refund id as the provider's idempotency key, until the
-- provider confirms it: requested -> refunded, through failed (retried)
-- when a call does not, or `rejected` when the provider refuses it for good
-- (it does not know the payment, it was refunded already): an operator's
-- case, never retried on its own. The provider's refund id is unique: one
-- payment, one refund, one provider refund, whatever the retries.
--
-- Payments recorded for refund before this migration get no row: some may
-- have been given back by hand since. `dropctl check` shows them (the row
-- "each refund made once"); the README's "Refunds" says how to queue one.
CREATE TABLE IF NOT EXISTS refunds (
    refund_id           CHAR(36) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    payment_id          VARCHAR(128)    NOT NULL,
    order_id            CHAR(36) CHARACTER SET ascii NOT NULL,
    event_id            BIGINT UNSIGNED NULL,
    amount_cents        BIGINT UNSIGNED NOT NULL,
    state               ENUM('requested', 'refunded', 'failed', 'rejected') NOT NULL,
    provider_refund_id  VARCHAR(128)    NULL,
    attempts            INT UNSIGNED    NOT NULL DEFAULT 0,
    last_error          VARCHAR(255)    NULL,
    next_attempt_at     DATETIME(3)     NOT NULL,
    -- Whoever is calling the provider for it, until when.
    claimed_until       DATETIME(3)     NULL,
    requested_at        DATETIME(3)     NOT NULL,
    refunded_at         DATETIME(3)     NULL,
    UNIQUE KEY refunds_by_payment (payment_id),
    UNIQUE KEY refunds_by_provider_refund (provider_refund_id),
    KEY refunds_due (state, next_attempt_at),
    KEY refunds_by_event (event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Refund changes travel on the outbox like order changes: the refund's id
-- and its payment's are theirs.
ALTER TABLE outbox
    MODIFY subject ENUM('order', 'event', 'refund') NOT NULL,
    ADD COLUMN refund_id CHAR(36) CHARACTER SET ascii NULL,
    ADD COLUMN payment_id VARCHAR(128) NULL;

CREATE TRIGGER payments_to_refunds_on_insert AFTER INSERT ON payments FOR EACH ROW
    INSERT IGNORE INTO refunds (refund_id, payment_id, order_id, event_id, amount_cents, state, next_attempt_at,
                                requested_at)
    SELECT UUID(), NEW.payment_id, NEW.order_id, (SELECT event_id FROM orders WHERE order_id = NEW.order_id),
           NEW.amount_cents, 'requested', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)
    FROM DUAL WHERE NEW.disposition = 'refund_required' AND NEW.amount_cents > 0;

CREATE TRIGGER payments_to_refunds_on_update AFTER UPDATE ON payments FOR EACH ROW
    INSERT IGNORE INTO refunds (refund_id, payment_id, order_id, event_id, amount_cents, state, next_attempt_at,
                                requested_at)
    SELECT UUID(), NEW.payment_id, NEW.order_id, (SELECT event_id FROM orders WHERE order_id = NEW.order_id),
           NEW.amount_cents, 'requested', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)
    FROM DUAL WHERE NEW.disposition = 'refund_required' AND OLD.disposition <> 'refund_required'
    AND NEW.amount_cents > 0;

CREATE TRIGGER refunds_to_outbox_on_insert AFTER INSERT ON refunds FOR EACH ROW
    INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents, expires_at,
                        changed_at, refund_id, payment_id)
    SELECT UUID(), 'refund', 'refund_requested', o.event_id, NEW.order_id, o.user_id, o.quantity, NEW.amount_cents,
           o.expires_at, NEW.requested_at, NEW.refund_id, NEW.payment_id
    FROM orders o WHERE o.order_id = NEW.order_id;

-- Only the move to refunded is a change: a failed call is retried, and
-- what the buyer hears of is the money back. Claims and failures update the
-- row too; they read nothing else.
CREATE TRIGGER refunds_to_outbox_on_update AFTER UPDATE ON refunds FOR EACH ROW
BEGIN
    IF NEW.state = 'refunded' AND OLD.state <> 'refunded' THEN
        INSERT INTO outbox (change_id, subject, kind, event_id, order_id, user_id, quantity, amount_cents,
                            expires_at, changed_at, refund_id, payment_id)
        SELECT UUID(), 'refund', 'refunded', o.event_id, NEW.order_id, o.user_id, o.quantity, NEW.amount_cents,
               o.expires_at, NEW.refunded_at, NEW.refund_id, NEW.payment_id
        FROM orders o WHERE o.order_id = NEW.order_id;
    END IF;
END;
