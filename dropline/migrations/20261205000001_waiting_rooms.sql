-- An event's waiting room: its settings, the seed of its draw and what the
-- draw published. The line itself lives in Redis (see dropline::room); this
-- row keeps the room's terms and the whole published draw on the record.
CREATE TABLE IF NOT EXISTS waiting_rooms (
    event_id           BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    mode               ENUM('fcfs', 'lottery') NOT NULL DEFAULT 'fcfs',
    prequeue_opens_at  DATETIME(3)     NOT NULL,
    outflow_per_sec    INT UNSIGNED    NOT NULL,
    time_to_act_secs   INT UNSIGNED    NOT NULL,
    -- Zero bits a join's proof of work must have; 0: no proof asked.
    proof_of_work_bits TINYINT UNSIGNED NOT NULL DEFAULT 0,
    -- Secret until the draw; its SHA-256 is published from the start.
    seed               BINARY(32)      NOT NULL,
    seed_commitment    CHAR(64) CHARACTER SET ascii NOT NULL,
    -- A public randomness beacon round named in advance, mixed into the
    -- draw; its randomness (hex) as an admin entered it.
    beacon_name        VARCHAR(100)    NULL,
    beacon_round       BIGINT UNSIGNED NULL,
    beacon_randomness  VARCHAR(128) CHARACTER SET ascii NULL,
    list_hash          CHAR(64) CHARACTER SET ascii NULL,
    entrants           INT UNSIGNED    NULL,
    drawn_at           DATETIME(3)     NULL,
    -- The drawn order, as the draw published it: each ticket id's 16 bytes,
    -- first place first. Kept so the draw can be checked after Redis let
    -- the room go.
    drawn_order        LONGBLOB        NULL,
    created_at         DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    CONSTRAINT waiting_rooms_event FOREIGN KEY (event_id) REFERENCES events (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
