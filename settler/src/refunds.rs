//! The refund worker: gives back, through the payment provider, the money
//! of every payment the record keeps for refund (a late payment, one for a
//! voided hold, one that did not match its order).
//!
//! The record writes a refund row in the transaction that marks a payment
//! for refund (the migration's triggers). Every settler runs this worker;
//! each claims the rows due for a while (skipping rows another is claiming)
//! and calls the provider's `POST /v1/refunds` with the refund id as the
//! idempotency key. So a call retried after a timeout, a lost answer or a
//! crash of this process names the same refund, and the provider makes it
//! once: the row records the provider's refund id, unique in the table.
//! A failed call leaves the row `failed`, tried again after a backoff that
//! doubles up to a cap, for as long as it takes: the money is owed.

use std::time::Duration;

use chrono::Utc;
use dropline::payments::{CreateRefund, ProviderRefund};
use dropline::retry::Backoff;
use futures::StreamExt;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OLDEST_REFUND, REFUNDS_WAITING, REFUND_CALLS};
use crate::record::refunds::{self, Due};

/// Refunds claimed per pass, and called at once.
const PER_PASS: u32 = 64;
const AT_ONCE: usize = 8;

#[derive(Debug, Clone)]
pub struct RefundOptions {
    /// The provider's API, without a trailing slash.
    pub provider_url: String,
    pub poll: Duration,
    /// One call's limit.
    pub timeout: Duration,
    pub backoff: Backoff,
}

pub struct Refunder {
    pub db: MySqlPool,
    pub http: reqwest::Client,
    pub options: RefundOptions,
}

impl Refunder {
    pub fn new(db: MySqlPool, options: RefundOptions) -> reqwest::Result<Self> {
        let http =
            reqwest::Client::builder().timeout(options.timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self { db, http, options })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(provider = %dropline::config::origin(&self.options.provider_url), "refunding through the provider");
        loop {
            let full = match self.pass().await {
                Ok(n) => n == PER_PASS as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "refund pass failed; trying again");
                    false
                }
            };
            if !full {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.options.poll) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Claims the refunds due and calls the provider for each; how many.
    async fn pass(&self) -> Result<usize, sqlx::Error> {
        // A claim outlasts the slowest round of calls, so no other settler
        // calls for the same refund meanwhile (the key would make it
        // harmless, but not free).
        let rounds = (PER_PASS as u64).div_ceil(AT_ONCE as u64);
        let claim_secs = self.options.timeout.as_secs().saturating_add(1).saturating_mul(rounds) + 30;
        let due = refunds::claim(&self.db, PER_PASS, claim_secs).await?;
        let n = due.len();
        futures::stream::iter(due).for_each_concurrent(AT_ONCE, |d| self.attempt(d)).await;
        let (waiting, oldest) = refunds::waiting(&self.db).await?;
        ::metrics::gauge!(REFUNDS_WAITING.name).set(waiting as f64);
        ::metrics::gauge!(OLDEST_REFUND.name).set(oldest);
        Ok(n)
    }

    async fn attempt(&self, due: Due) {
        let recorded = match self.call(&due).await {
            Ok(made) => {
                ::metrics::counter!(REFUND_CALLS.name, "result" => "refunded").increment(1);
                tracing::info!(refund_id = %due.refund_id, payment_id = %due.payment_id,
                    provider_refund_id = %made.refund_id, amount_cents = due.amount_cents, "refunded");
                refunds::refunded(&self.db, &due.refund_id, &made.refund_id).await
            }
            Err(e) => {
                ::metrics::counter!(REFUND_CALLS.name, "result" => "failed").increment(1);
                let wait = self.options.backoff.after(due.attempts + 1);
                tracing::warn!(refund_id = %due.refund_id, payment_id = %due.payment_id, attempts = due.attempts + 1,
                    retry_in_ms = wait.as_millis() as u64, error = %e, "refund call failed; retrying later");
                let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_else(|_| chrono::Duration::days(1));
                refunds::failed(&self.db, &due.refund_id, &e.to_string(), next).await
            }
        };
        // The claim runs out and the next pass calls again, with the same
        // key: the provider answers the refund it made.
        if let Err(e) = recorded {
            tracing::warn!(refund_id = %due.refund_id, error = %e, "recording a refund call failed; it is called again");
        }
    }

    async fn call(&self, due: &Due) -> Result<ProviderRefund, CallError> {
        let body = CreateRefund { payment_id: due.payment_id.clone(), amount_cents: due.amount_cents };
        let answer = self
            .http
            .post(format!("{}/v1/refunds", self.options.provider_url))
            .header("idempotency-key", &due.refund_id)
            .json(&body)
            .send()
            .await?;
        let status = answer.status();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            return Err(CallError::Refused(status.as_u16(), text.chars().take(200).collect()));
        }
        let made: ProviderRefund = answer.json().await?;
        if made.payment_id != due.payment_id || made.amount_cents != due.amount_cents {
            return Err(CallError::Mismatch(made.refund_id));
        }
        Ok(made)
    }
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("the provider could not be reached or answered unreadably: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("the provider answered {0}: {1}")]
    Refused(u16, String),
    #[error("the provider's refund {0} is of another payment or amount")]
    Mismatch(String),
}
