//! dropctl: Dropline's operator tool.
//!
//! - [`api`]: a typed client of the HTTP API.
//! - [`ceiling`]: what the machine does with the bare building blocks, for
//!   the performance report.
//! - [`drill`]: a flash sale played out by a crowd of buyers (the demo).
//! - [`invariants`]: the checks that the books balance, against MySQL and
//!   Redis.
//! - [`load`]: load wrk cannot make, for the performance report: thousands
//!   of event streams at once, purchases at a fixed rate.
//! - [`prometheus`]: queries of Prometheus, for the demo's headline numbers
//!   and the monitoring test.
//! - [`quiet`]: when to check: the pipeline caught up, by its consumer
//!   groups' offsets and the holds' deadlines.
//! - [`receiver`]: the host's end of the notifier's webhooks, for the
//!   local stack, the demo and the tests.
//! - [`record`]: dropctl's own queries of MySQL, for both.
//! - [`tokens`]: the secrets dropctl mints tokens with, and their checks.

pub mod api;
pub mod ceiling;
pub mod drill;
pub mod invariants;
pub mod load;
pub mod prometheus;
pub mod quiet;
pub mod receiver;
pub mod record;
pub mod tokens;
