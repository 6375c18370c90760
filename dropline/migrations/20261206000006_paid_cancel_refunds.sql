-- The share of a paid order's payment to refund, kept on the order when its
-- buyer cancels it within the policy (or the host cancels the event: all of
-- it). Whatever order the order's changes and its payment reach the record
-- in (a payment redelivered after the cancel, or published by another
-- ingress after it), the payment is marked for refund of this share, not of
-- all of it.
ALTER TABLE orders ADD COLUMN refund_cents BIGINT UNSIGNED NULL;
