-- The commit point Redis cannot break. Redis hands every hold unit numbers
-- from 1 to the event's capacity; a unit belongs to at most one order here
-- (the primary key), and the settler lets an order take a unit only from an
-- order that no longer holds it. A ledger that lost writes and hands a unit
-- out twice is refused here: the second order is voided, never oversold.
CREATE TABLE IF NOT EXISTS order_units (
    event_id  BIGINT UNSIGNED NOT NULL,
    unit_no   INT UNSIGNED    NOT NULL,
    order_id  CHAR(36) CHARACTER SET ascii NOT NULL,
    PRIMARY KEY (event_id, unit_no),
    KEY order_units_by_order (order_id),
    CONSTRAINT order_units_numbered_from_one CHECK (unit_no >= 1)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- 'voided': the record refused the hold (a unit or the buyer's limit was
-- already taken by a live order); its payment, if any, is refunded.
ALTER TABLE orders
    MODIFY state ENUM('held', 'paid', 'cancelled', 'expired', 'voided') NOT NULL;

-- The per-buyer count the settler checks against the limit, per event.
CREATE INDEX orders_by_buyer ON orders (event_id, user_id, state);
