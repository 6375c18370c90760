-- Dropline's record of truth. Redis is the fast path for stock; every order,
-- decision and payment ends up here, written idempotently by the settler.

CREATE TABLE IF NOT EXISTS events (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name            VARCHAR(200)    NOT NULL,
    venue           VARCHAR(200)    NOT NULL,
    starts_at       DATETIME(3)     NOT NULL,
    sale_opens_at   DATETIME(3)     NOT NULL,
    sale_closes_at  DATETIME(3)     NOT NULL,
    capacity        INT UNSIGNED    NOT NULL,
    price_cents     BIGINT UNSIGNED NOT NULL,
    currency        CHAR(3)         NOT NULL,
    per_user_limit  INT UNSIGNED    NOT NULL,
    hold_ttl_secs   INT UNSIGNED    NOT NULL,
    created_at      DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY events_by_opening (sale_opens_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per decided intent: its one outcome.
CREATE TABLE IF NOT EXISTS intents (
    intent_id      CHAR(36) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    event_id       BIGINT UNSIGNED NOT NULL,
    user_id        VARCHAR(128)    NOT NULL,
    quantity       INT UNSIGNED    NOT NULL,
    outcome        ENUM('held', 'rejected') NOT NULL,
    reject_reason  VARCHAR(32)     NULL,
    decided_at     DATETIME(3)     NOT NULL,
    KEY intents_by_event (event_id, outcome)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- An order exists for every hold; its id is the intent id. State only moves
-- forward: held, then exactly one of paid, cancelled or expired.
CREATE TABLE IF NOT EXISTS orders (
    order_id      CHAR(36) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    event_id      BIGINT UNSIGNED NOT NULL,
    user_id       VARCHAR(128)    NOT NULL,
    quantity      INT UNSIGNED    NOT NULL,
    amount_cents  BIGINT UNSIGNED NOT NULL,
    state         ENUM('held', 'paid', 'cancelled', 'expired') NOT NULL,
    expires_at    DATETIME(3)     NOT NULL,
    created_at    DATETIME(3)     NOT NULL,
    updated_at    DATETIME(3)     NOT NULL,
    KEY orders_by_event (event_id, state),
    KEY orders_by_user (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Every payment the provider confirmed, keyed by the provider's event id:
-- captured (it paid the order) or refund_required (the order had ended).
CREATE TABLE IF NOT EXISTS payments (
    provider_event_id  VARCHAR(128)    NOT NULL PRIMARY KEY,
    payment_id         VARCHAR(128)    NOT NULL,
    order_id           CHAR(36) CHARACTER SET ascii NOT NULL,
    amount_cents       BIGINT UNSIGNED NOT NULL,
    disposition        ENUM('captured', 'refund_required') NOT NULL,
    recorded_at        DATETIME(3)     NOT NULL,
    KEY payments_by_order (order_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
