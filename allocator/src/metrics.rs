//! The allocator's metrics: declared with every other in [`dropline::catalog`].

pub use dropline::catalog::allocator::*;
