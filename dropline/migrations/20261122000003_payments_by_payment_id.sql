-- One row per provider payment. The table was keyed by the webhook's event
-- id, so a provider that delivers the same payment under a new event id (a
-- retry it re-issues, a second notification type) made a second row, and the
-- same money counted twice. The provider's payment id is the key now; the
-- event id kept is the first delivery's.

-- Collapse what the old key let in: keep each payment's first row.
DELETE later FROM payments later
JOIN payments first
  ON first.payment_id = later.payment_id
 AND (first.recorded_at < later.recorded_at
      OR (first.recorded_at = later.recorded_at AND first.provider_event_id < later.provider_event_id));

ALTER TABLE payments
    DROP PRIMARY KEY,
    ADD PRIMARY KEY (payment_id),
    ADD KEY payments_by_provider_event (provider_event_id);
