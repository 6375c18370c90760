//! Reminders: a buyer whose hold is still held shortly before its deadline
//! is told so, once.
//!
//! The notifier writes a reminder row for each hold it delivers (with its
//! due time, the deadline minus the lead), in the transaction that records
//! the hold's webhook. This loop claims the due ones (for longer than a
//! round of sends takes, so two notifiers do not both send one), sends
//! those whose order is still held, and marks them done; a hold that
//! ended, or whose deadline passed, is marked done unsent. A failed send is
//! tried again when its claim runs out, until the deadline. The reminder's
//! id is derived from the hold's change id, so a reminder sent twice (a
//! notifier killed after the send, before the record) carries the same id.

use std::time::Duration;

use futures::StreamExt;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::deliver::{self, Webhooks};
use crate::metrics::REMINDERS;
use crate::record::{self, Settled};

/// Reminders claimed at once.
const CLAIM_MAX: u32 = 200;

/// The webhook id of the reminder of the hold announced by `held_change`.
pub fn id_of(held_change: Uuid) -> Uuid {
    Uuid::new_v5(&held_change, deliver::REMINDER_KIND.as_bytes())
}

/// How reminders are sent.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// How often due reminders are looked for.
    pub every: Duration,
    /// Reminders sent at once.
    pub concurrency: usize,
    /// The longest one send may take.
    pub attempt_timeout: Duration,
}

impl Pace {
    /// How long a claim lasts: a whole round of sends (each at most the
    /// attempt timeout, `concurrency` at once), then half a minute to
    /// record them.
    fn claim_secs(&self) -> u64 {
        let rounds = (CLAIM_MAX as usize).div_ceil(self.concurrency) as u64;
        rounds * self.attempt_timeout.as_secs().max(1) + 30
    }
}

pub async fn run(db: MySqlPool, webhooks: Webhooks, pace: Pace, shutdown: CancellationToken) {
    let every = pace.every;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = remind_due(&db, &webhooks, &pace).await {
            tracing::warn!(error = %e, "sending reminders failed; trying again");
        }
    }
}

async fn remind_due(db: &MySqlPool, webhooks: &Webhooks, pace: &Pace) -> Result<(), sqlx::Error> {
    let due = record::claim_due(db, CLAIM_MAX, pace.claim_secs()).await?;
    if due.is_empty() {
        return Ok(());
    }
    let sends: Vec<_> = due
        .iter()
        .map(|r| {
            let (webhooks, id, body) = (webhooks.clone(), r.id, deliver::reminder_body(r));
            async move { webhooks.send(id, &body).await }
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(sends).buffered(pace.concurrency).collect().await;
    let mut sent = Vec::new();
    for (r, result) in due.iter().zip(results) {
        match result {
            Ok(()) => {
                ::metrics::counter!(REMINDERS.name, "outcome" => "sent").increment(1);
                sent.push(Settled {
                    id: r.id,
                    kind: deliver::REMINDER_KIND.to_owned(),
                    event_id: r.event_id,
                    order_id: Some(r.order_id),
                    delivered: true,
                    attempts: 1,
                    last_error: None,
                });
            }
            Err(e) => {
                ::metrics::counter!(REMINDERS.name, "outcome" => "failed").increment(1);
                tracing::debug!(order_id = %r.order_id, error = %e, "a reminder failed; trying again after its claim");
            }
        }
    }
    let orders: Vec<Uuid> = sent.iter().filter_map(|s| s.order_id).collect();
    record::settle(db, &sent, &[], &orders).await
}
