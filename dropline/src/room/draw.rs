//! The draw that orders a waiting room's pre-queue, in a form anyone can
//! check.
//!
//! 1. When the room is set up, a random seed is made and only its
//!    commitment, `SHA-256(seed)`, is published.
//! 2. At the opening the pre-queue is frozen, and the hash of the list of
//!    its ticket ids ([`list_hash`]) is published before the seed is.
//! 3. Each ticket's place is the order of `SHA-256(tag, seed, list hash,
//!    ticket id)` ([`order`]). The seed is published after the draw.
//!
//! The seed is fixed before anyone joins and the list before the seed is
//! revealed, so neither can be picked after seeing the other; and with the
//! seed, the list and this file anyone recomputes every place ([`verify`]).
//!
//! A room may also name, in advance, a round of a public randomness beacon
//! (drand, say) published after its opening. The draw then orders by
//! [`beacon_seed`]: the committed seed mixed with that round's randomness,
//! which nobody (the operator included) knows until the list is fixed.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Bytes of a draw's seed.
pub const SEED_LEN: usize = 32;

/// Separates a draw's hashes from any other use of the same bytes.
const DOMAIN: &[u8] = b"dropline-draw-v1";

/// A fresh random seed.
pub fn new_seed() -> [u8; SEED_LEN] {
    rand::random()
}

/// The published commitment to `seed`: its SHA-256, in hex.
pub fn commitment(seed: &[u8]) -> String {
    hex::encode(Sha256::digest(seed))
}

/// The hash of the pre-queue's ticket ids: SHA-256 over each id in its
/// hyphenated lower-case form followed by a newline, in ascending order
/// (the order they are given in does not matter). In hex.
pub fn list_hash(tickets: &[Uuid]) -> String {
    let mut sorted = tickets.to_vec();
    sorted.sort_unstable();
    let mut hasher = Sha256::new();
    for ticket in &sorted {
        hasher.update(ticket.hyphenated().to_string().as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// The seed a draw orders by when it mixes in a beacon round's randomness:
/// SHA-256 of a tag, the committed seed and the randomness.
pub fn beacon_seed(seed: &[u8], randomness: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(b"dropline-draw-beacon-v1").chain_update(seed).chain_update(randomness).finalize().into()
}

/// A beacon round a room mixes into its draw, and its randomness once known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Beacon {
    /// Which beacon (a drand chain's name or hash, say).
    pub name: String,
    pub round: u64,
    /// The round's randomness, hex; absent until an admin enters it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub randomness: Option<String>,
}

/// The drawn order of `tickets`: by the SHA-256 of the domain tag, the
/// seed, the list hash (its 32 bytes) and the ticket id (its 16 bytes).
pub fn order(seed: &[u8], list_hash_hex: &str, tickets: &[Uuid]) -> Vec<Uuid> {
    let list = hex::decode(list_hash_hex).unwrap_or_default();
    let mut keyed: Vec<([u8; 32], Uuid)> = tickets
        .iter()
        .map(|t| {
            let key =
                Sha256::new().chain_update(DOMAIN).chain_update(seed).chain_update(&list).chain_update(t.as_bytes());
            (key.finalize().into(), *t)
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, t)| t).collect()
}

/// A draw as the ingress publishes it once it is done.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PublishedDraw {
    pub event_id: u64,
    pub seed_commitment: String,
    /// Hex.
    pub seed: String,
    pub list_hash: String,
    /// The beacon round mixed in, if the room named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beacon: Option<Beacon>,
    /// Every ticket of the pre-queue, first place first.
    pub order: Vec<Uuid>,
}

/// Why a published draw does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrawMismatch {
    #[error("the seed is not hex of {SEED_LEN} bytes")]
    BadSeed,
    #[error("the seed does not match the commitment published before the pre-queue opened")]
    Commitment,
    #[error("the list of tickets does not hash to the list hash published at the opening")]
    ListHash,
    #[error("the room named a beacon round but the draw gives no randomness for it")]
    NoBeaconRandomness,
    #[error("a ticket is listed twice")]
    Duplicate,
    #[error("the order differs from the one the seed and the list give, first at place {0}")]
    Order(usize),
}

/// Checks a published draw from its own parts: the seed against its
/// commitment, the tickets against the list hash, and every place.
pub fn verify(draw: &PublishedDraw) -> Result<(), DrawMismatch> {
    let seed = hex::decode(&draw.seed).map_err(|_| DrawMismatch::BadSeed)?;
    if seed.len() != SEED_LEN {
        return Err(DrawMismatch::BadSeed);
    }
    if commitment(&seed) != draw.seed_commitment {
        return Err(DrawMismatch::Commitment);
    }
    let mut unique = draw.order.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != draw.order.len() {
        return Err(DrawMismatch::Duplicate);
    }
    if list_hash(&draw.order) != draw.list_hash {
        return Err(DrawMismatch::ListHash);
    }
    let draw_seed = match &draw.beacon {
        None => seed,
        Some(beacon) => {
            let randomness = beacon.randomness.as_deref().ok_or(DrawMismatch::NoBeaconRandomness)?;
            let randomness = hex::decode(randomness).map_err(|_| DrawMismatch::NoBeaconRandomness)?;
            beacon_seed(&seed, &randomness).to_vec()
        }
    };
    let expected = order(&draw_seed, &draw.list_hash, &draw.order);
    match expected.iter().zip(&draw.order).position(|(a, b)| a != b) {
        Some(i) => Err(DrawMismatch::Order(i + 1)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tickets(n: u128) -> Vec<Uuid> {
        (1..=n).map(|i| Uuid::from_u128(i * 0x9e37_79b9_7f4a_7c15)).collect()
    }

    fn published(seed: [u8; SEED_LEN], entrants: &[Uuid]) -> PublishedDraw {
        let list = list_hash(entrants);
        PublishedDraw {
            event_id: 1,
            seed_commitment: commitment(&seed),
            seed: hex::encode(seed),
            order: order(&seed, &list, entrants),
            list_hash: list,
            beacon: None,
        }
    }

    #[test]
    fn the_list_hash_does_not_depend_on_the_order_given() {
        let mut t = tickets(50);
        let a = list_hash(&t);
        t.reverse();
        assert_eq!(a, list_hash(&t));
        assert_ne!(a, list_hash(&t[1..]));
    }

    #[test]
    fn the_order_is_a_permutation_fixed_by_seed_and_list() {
        let t = tickets(1000);
        let list = list_hash(&t);
        let a = order(&[1; SEED_LEN], &list, &t);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, {
            let mut s = t.clone();
            s.sort_unstable();
            s
        });
        let mut shuffled = t.clone();
        shuffled.reverse();
        assert_eq!(a, order(&[1; SEED_LEN], &list, &shuffled), "the input order must not matter");
        assert_ne!(a, order(&[2; SEED_LEN], &list, &t), "another seed, another order");
        assert_ne!(a, t, "not the order of arrival");
    }

    #[test]
    fn a_true_draw_verifies_and_every_tampering_is_caught() {
        let t = tickets(200);
        let draw = published([7; SEED_LEN], &t);
        assert_eq!(verify(&draw), Ok(()));

        let mut swapped = draw.clone();
        swapped.order.swap(3, 4);
        assert_eq!(verify(&swapped), Err(DrawMismatch::Order(4)));

        let mut other_seed = draw.clone();
        other_seed.seed = hex::encode([8; SEED_LEN]);
        assert_eq!(verify(&other_seed), Err(DrawMismatch::Commitment));

        // A seed chosen after the list was known, with its commitment
        // rewritten: the order follows, but the published commitment
        // (the one buyers saw) would not.
        let mut added = published([7; SEED_LEN], &t);
        added.order.push(Uuid::from_u128(42));
        assert_eq!(verify(&added), Err(DrawMismatch::ListHash));

        let mut twice = draw.clone();
        twice.order[1] = twice.order[0];
        assert_eq!(verify(&twice), Err(DrawMismatch::Duplicate));

        let mut short = draw;
        short.seed = "abcd".into();
        assert_eq!(verify(&short), Err(DrawMismatch::BadSeed));
    }

    #[test]
    fn a_beacon_draw_verifies_only_with_the_round_randomness_it_mixed_in() {
        let t = tickets(100);
        let seed = [3; SEED_LEN];
        let randomness = [9u8; 32];
        let list = list_hash(&t);
        let beacon = Beacon { name: "quicknet".into(), round: 7, randomness: Some(hex::encode(randomness)) };
        let draw = PublishedDraw {
            event_id: 1,
            seed_commitment: commitment(&seed),
            seed: hex::encode(seed),
            order: order(&beacon_seed(&seed, &randomness), &list, &t),
            list_hash: list,
            beacon: Some(beacon),
        };
        assert_eq!(verify(&draw), Ok(()));
        // Without the beacon the seed alone gives another order.
        let mut without = draw.clone();
        without.beacon = None;
        assert!(matches!(verify(&without), Err(DrawMismatch::Order(_))));
        let mut other = draw.clone();
        other.beacon.as_mut().unwrap().randomness = Some(hex::encode([8u8; 32]));
        assert!(matches!(verify(&other), Err(DrawMismatch::Order(_))));
        let mut missing = draw;
        missing.beacon.as_mut().unwrap().randomness = None;
        assert_eq!(verify(&missing), Err(DrawMismatch::NoBeaconRandomness));
    }

    #[test]
    fn an_empty_pre_queue_draws_an_empty_order() {
        assert_eq!(verify(&published([0; SEED_LEN], &[])), Ok(()));
    }
}
