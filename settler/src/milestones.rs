//! The sale's milestones, as the record sees them: an event's sale opened;
//! every unit it may sell (capacity and oversell allowance) is paid for,
//! sold out; and back on sale when a paid order's cancel or more stock
//! makes units available again. Each is a column of the event
//! (`opened_at`, `sold_out_at`) that one conditional UPDATE moves, and the
//! event's outbox trigger announces the move in the same transaction: every
//! settler looks, and a milestone is recorded and announced once.
//!
//! Counting an event's paid units reads all of its paid orders, so an event
//! is counted only when the ledger says its state may have moved: the
//! ledger records a payment (and a paid order's cancel) before the record
//! does, so while its `sold` count is short of what the event may sell, the
//! record's is too. A missing ledger is no hint: then the record counts.

use std::time::Duration;

use dropline::stock::Ledger;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::MILESTONES;
use crate::record::{events, orders};

/// The most events watched for selling out at once: the newest (sales open
/// or closed less than a day ago).
const MAX_EVENTS: u32 = 5_000;

pub struct Milestones {
    pub db: MySqlPool,
    pub ledger: Ledger,
    pub every: Duration,
}

impl Milestones {
    /// Looks every `every`, until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "looking for the sales' milestones failed; trying again next pass");
            }
        }
    }

    async fn pass(&self) -> Result<(), anyhow::Error> {
        let opened = events::open_due(&self.db).await?;
        if opened > 0 {
            ::metrics::counter!(MILESTONES.name, "milestone" => "opened").increment(opened);
            tracing::info!(events = opened, "sales opened");
        }
        let selling = events::selling(&self.db, MAX_EVENTS).await?;
        if selling.is_empty() {
            return Ok(());
        }
        if selling.len() == MAX_EVENTS as usize {
            tracing::warn!(
                watched = MAX_EVENTS,
                "more sales than the sold-out watch looks at; the oldest are not watched"
            );
        }
        let ids: Vec<u64> = selling.iter().map(|e| e.id).collect();
        let levels = self.ledger.levels_of(&ids).await?;
        let may_move: Vec<events::Selling> = selling
            .into_iter()
            .zip(levels)
            .filter(|(event, levels)| match levels {
                _ if event.sold_out && event.closed => false,
                Some(l) => (l.sold >= event.sellable) != event.sold_out,
                None => true,
            })
            .map(|(event, _)| event)
            .collect();
        if may_move.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = may_move.iter().map(|e| e.id).collect();
        let paid = orders::paid_units(&self.db, &ids).await?;
        for event in may_move {
            let sold_out = paid.get(&event.id).copied().unwrap_or(0) >= event.sellable;
            if sold_out != event.sold_out && events::set_sold_out(&self.db, event.id, sold_out).await? {
                let milestone = if sold_out { "sold_out" } else { "back_on_sale" };
                ::metrics::counter!(MILESTONES.name, "milestone" => milestone).increment(1);
                tracing::info!(event_id = event.id, milestone, "a sale's milestone");
            }
        }
        Ok(())
    }
}
