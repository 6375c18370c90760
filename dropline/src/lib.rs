//! What Dropline's four stages share.
//!
//! - [`messages`]: topic names and the messages on them, the contract
//!   between ingress, allocator, settler and expirer.
//! - [`stock`]: the Redis stock ledger and the Lua scripts that alone change
//!   it (allocate, pay, cancel, expire), and every Redis key's name
//!   ([`stock::keys`]).
//! - [`redis_pool`]: the pool of Redis connections every stage uses.
//! - [`room`]: waiting rooms, their Lua scripts and the auditable draw
//!   ([`room::draw`]) that orders a pre-queue.
//! - [`db`]: the MySQL pool and the schema's migrations; [`events`]: events
//!   as the record keeps them and the terms admins create them with, and the sale rules
//!   they load into the ledger.
//! - [`kafka`]: the one publisher, consumer setup, the one batch-consumer loop,
//!   group membership and readiness, offset storage and the dead-letter
//!   topic.
//! - [`payments`]: the payment provider's webhook body and HMAC signature.
//! - [`auth`]: buyers' and admins' bearer tokens; [`secrets`]: the checks
//!   every signing secret passes before a process starts.
//! - [`stage`]: the stage kit, one start-up and one `main` for every stage;
//!   [`config`], [`telemetry`], [`ops`], [`shutdown`]: how every stage is
//!   configured, observed, probed and stopped; [`catalog`]: every metric.

pub mod auth;
pub mod catalog;
pub mod config;
pub mod db;
pub mod events;
pub mod kafka;
pub mod messages;
pub mod ops;
pub mod payments;
pub mod redis_pool;
pub mod retry;
pub mod room;
pub mod secrets;
pub mod shutdown;
pub mod stage;
pub mod stock;
pub mod telemetry;
