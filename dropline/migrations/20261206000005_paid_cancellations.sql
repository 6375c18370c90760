-- A buyer may cancel a paid order within the event's cancellation policy:
-- its payment is then recorded for refund of the policy's share of it
-- (refund_cents), not of all of it. The refund triggers read that share
-- (all of the payment when none is set: a late payment, a mismatch, a
-- voided hold), and a refund of nothing is no refund.
--
-- MySQL has no CREATE OR REPLACE TRIGGER: upgrade to this migration with
-- no settler running (see the README).
ALTER TABLE payments ADD COLUMN refund_cents BIGINT UNSIGNED NULL;

DROP TRIGGER IF EXISTS payments_to_refunds_on_insert;
CREATE TRIGGER payments_to_refunds_on_insert AFTER INSERT ON payments FOR EACH ROW
    INSERT IGNORE INTO refunds (refund_id, payment_id, order_id, event_id, amount_cents, state, next_attempt_at,
                                requested_at)
    SELECT UUID(), NEW.payment_id, NEW.order_id, (SELECT event_id FROM orders WHERE order_id = NEW.order_id),
           COALESCE(NEW.refund_cents, NEW.amount_cents), 'requested', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)
    FROM DUAL WHERE NEW.disposition = 'refund_required' AND COALESCE(NEW.refund_cents, NEW.amount_cents) > 0;

DROP TRIGGER IF EXISTS payments_to_refunds_on_update;
CREATE TRIGGER payments_to_refunds_on_update AFTER UPDATE ON payments FOR EACH ROW
    INSERT IGNORE INTO refunds (refund_id, payment_id, order_id, event_id, amount_cents, state, next_attempt_at,
                                requested_at)
    SELECT UUID(), NEW.payment_id, NEW.order_id, (SELECT event_id FROM orders WHERE order_id = NEW.order_id),
           COALESCE(NEW.refund_cents, NEW.amount_cents), 'requested', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)
    FROM DUAL WHERE NEW.disposition = 'refund_required' AND OLD.disposition <> 'refund_required'
    AND COALESCE(NEW.refund_cents, NEW.amount_cents) > 0;
