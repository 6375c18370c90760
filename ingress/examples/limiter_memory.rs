//! What the per-address limiter holds for a flood of distinct addresses:
//! the process's resident memory before and after a million addresses
//! each make one request, and after the periodic prune. For
//! `scripts/bench.sh`; prints one JSON object.
//!
//!   cargo run --release -p dropline-ingress --example limiter_memory [KEYS]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use dropline_ingress::limits::{Limits, Rates};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    let keys: u32 = std::env::args().nth(1).and_then(|k| k.parse().ok()).unwrap_or(1_000_000);
    // The ingress's defaults for an address: 200 a second, a burst of 400.
    let rates = Rates { ip: (200, 400), ..Rates::all(1_000_000, 1_000_000) };
    let limits = Limits::new(rates);
    let before = resident_bytes();
    let started = Instant::now();
    for i in 0..keys {
        // Addresses from 10.0.0.0 up: every one distinct.
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        limits.ip(ip).expect("a first request is never refused");
    }
    let filled_in = started.elapsed();
    let held = limits.tracked_addresses();
    let after = resident_bytes();
    // A key is dropped once its budget is whole again: one request at 200
    // a second is 5 ms.
    std::thread::sleep(Duration::from_millis(20));
    let pruning = Instant::now();
    limits.prune();
    let pruned_in = pruning.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "keys": keys,
            "held": held,
            "resident_growth_bytes": after.saturating_sub(before),
            "bytes_per_key": after.saturating_sub(before) as f64 / f64::from(keys),
            "fill_secs": filled_in.as_secs_f64(),
            "held_after_prune": limits.tracked_addresses(),
            "prune_secs": pruned_in.as_secs_f64(),
            "resident_after_prune_bytes": resident_bytes().saturating_sub(before),
        })
    );
}
