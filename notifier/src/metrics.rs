//! The notifier's metrics: declared with every other in [`dropline::catalog`].

pub use dropline::catalog::notifier::*;
