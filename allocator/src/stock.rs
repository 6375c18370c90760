//! Stock gauges: available, held and sold units of the events this
//! allocator decided for recently, sampled from the ledger. The `event_id`
//! label is bounded: at most `MAX_EVENTS` events (a deployment runs a handful
//! of drops at a time), each kept for an hour after its last intent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dropline::stock::Ledger;
use tokio_util::sync::CancellationToken;

use crate::metrics::STOCK;

const MAX_EVENTS: usize = 200;
const KEEP_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct StockWatch {
    events: Mutex<HashMap<u64, Instant>>,
}

impl StockWatch {
    /// Notes that an intent for `event_id` was decided now.
    pub fn saw(&self, event_id: u64) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.insert(event_id, Instant::now());
        if events.len() > MAX_EVENTS {
            if let Some(oldest) = events.iter().min_by_key(|(_, at)| **at).map(|(id, _)| *id) {
                events.remove(&oldest);
            }
        }
    }

    fn watched(&self) -> Vec<u64> {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.retain(|_, at| at.elapsed() < KEEP_FOR);
        events.keys().copied().collect()
    }

    /// Samples the watched events every `every` until shutdown.
    pub async fn sample(self: Arc<Self>, ledger: Ledger, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for event_id in self.watched() {
                match ledger.levels(event_id).await {
                    Ok(Some(levels)) => {
                        let id = event_id.to_string();
                        for (state, units) in
                            [("available", levels.available), ("held", levels.held), ("sold", levels.sold)]
                        {
                            ::metrics::gauge!(STOCK.name, "event_id" => id.clone(), "state" => state).set(units as f64);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, event_id, "stock sample failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `event_id` label stays bounded however many events pass.
    #[test]
    fn at_most_max_events_are_watched() {
        let watch = StockWatch::default();
        for event_id in 0..MAX_EVENTS as u64 + 50 {
            watch.saw(event_id);
        }
        let watched = watch.watched();
        assert_eq!(watched.len(), MAX_EVENTS);
        assert!(watched.contains(&(MAX_EVENTS as u64 + 49)), "the event seen last is watched");
    }
}
