//! The Kafka clients' and the consumer loop's metrics: declared with every
//! other in [`crate::catalog`].

pub use crate::catalog::kafka::*;
