//! A cost to join a waiting room: a small proof of work, in the style of
//! ALTCHA and mCaptcha. The ingress hands a buyer a signed challenge; the
//! buyer finds a nonce whose SHA-256 with the challenge starts with the
//! room's number of zero bits, and sends both with the join. One buyer pays
//! it once (a join is idempotent); a farm of accounts pays it per account.
//!
//! A challenge is `<payload>.<tag>`: the payload is
//! `v1:<event>:<bits>:<expires, unix s>:<random hex>`, the tag its
//! HMAC-SHA256 together with the buyer's id, in hex. Nothing is stored: the
//! tag proves the ingress issued it, to this buyer, for this event.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Most zero bits a room may ask for (about 268 million hashes on average).
pub const MAX_BITS: u8 = 28;

/// How long a challenge may be answered.
pub const CHALLENGE_TTL_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the proof must be '<challenge>:<nonce>'")]
    Malformed,
    #[error("the challenge was not issued by this deployment to this buyer")]
    Forged,
    #[error("the challenge is for another event")]
    OtherEvent,
    #[error("the challenge has expired; ask for a new one")]
    Expired,
    #[error("the challenge asks for fewer zero bits than the room now does; ask for a new one")]
    TooEasy,
    #[error("the nonce does not give the zero bits the challenge asks for")]
    NotSolved,
}

/// Issues and checks the challenges of one deployment.
#[derive(Clone)]
pub struct Challenges {
    key: Vec<u8>,
}

impl Challenges {
    /// Keyed by a key derived from the admin secret, as admission tokens are
    /// (with another label).
    pub fn derived(admin_secret: &[u8]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(admin_secret).expect("HMAC takes a key of any length");
        mac.update(b"dropline join challenges v1");
        Self { key: mac.finalize().into_bytes().to_vec() }
    }

    fn mac(&self, payload: &str, user: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(payload.as_bytes());
        mac.update(b"\0");
        mac.update(user.as_bytes());
        mac
    }

    /// A challenge for `user` to join `event_id`'s room at `bits`.
    pub fn issue(&self, event_id: u64, user: &str, bits: u8, now_secs: i64) -> String {
        let nonce: [u8; 16] = rand::random();
        let payload = format!("v1:{event_id}:{bits}:{}:{}", now_secs + CHALLENGE_TTL_SECS, hex::encode(nonce));
        let tag = hex::encode(self.mac(&payload, user).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// Checks `proof` (`<challenge>:<nonce>`) for `user` joining
    /// `event_id`, whose room asks for `bits` now.
    pub fn verify(&self, proof: &str, event_id: u64, user: &str, bits: u8, now_secs: i64) -> Result<(), ProofError> {
        let (challenge, nonce) = proof.rsplit_once(':').ok_or(ProofError::Malformed)?;
        let (payload, tag) = challenge.split_once('.').ok_or(ProofError::Malformed)?;
        if nonce.is_empty() || nonce.len() > 64 {
            return Err(ProofError::Malformed);
        }
        // Compared in constant time: the tag is what a forger would probe.
        let given = hex::decode(tag).map_err(|_| ProofError::Forged)?;
        self.mac(payload, user).verify_slice(&given).map_err(|_| ProofError::Forged)?;
        let fields: Vec<&str> = payload.split(':').collect();
        let [_, event, asked, expires, _] = fields.as_slice() else { return Err(ProofError::Malformed) };
        if event.parse::<u64>().ok() != Some(event_id) {
            return Err(ProofError::OtherEvent);
        }
        if expires.parse::<i64>().map_err(|_| ProofError::Malformed)? < now_secs {
            return Err(ProofError::Expired);
        }
        let asked: u8 = asked.parse().map_err(|_| ProofError::Malformed)?;
        if asked < bits {
            return Err(ProofError::TooEasy);
        }
        if zero_bits(challenge, nonce) < u32::from(asked) {
            return Err(ProofError::NotSolved);
        }
        Ok(())
    }
}

/// Leading zero bits of SHA-256(`challenge` ":" `nonce`).
pub fn zero_bits(challenge: &str, nonce: &str) -> u32 {
    let digest = Sha256::new().chain_update(challenge).chain_update(b":").chain_update(nonce).finalize();
    let mut bits = 0;
    for byte in digest {
        if byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Solves `challenge` at `bits`: the proof to send (`<challenge>:<nonce>`).
/// What a buyer's browser does, in Rust, for tools and tests.
pub fn solve(challenge: &str, bits: u8) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|nonce| zero_bits(challenge, nonce) >= u32::from(bits))
        .map(|nonce| format!("{challenge}:{nonce}"))
        .expect("some nonce below 2^64 solves any challenge a room may set")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_solved_challenge_is_accepted_for_its_buyer_and_event_only() {
        let c = Challenges::derived(b"admin-key");
        let challenge = c.issue(7, "amy", 8, NOW);
        let proof = solve(&challenge, 8);
        assert_eq!(c.verify(&proof, 7, "amy", 8, NOW), Ok(()));
        assert_eq!(c.verify(&proof, 7, "ben", 8, NOW), Err(ProofError::Forged), "bound to its buyer");
        assert_eq!(c.verify(&proof, 8, "amy", 8, NOW), Err(ProofError::OtherEvent));
        assert_eq!(c.verify(&proof, 7, "amy", 8, NOW + CHALLENGE_TTL_SECS + 1), Err(ProofError::Expired));
        assert_eq!(c.verify(&proof, 7, "amy", 9, NOW), Err(ProofError::TooEasy));
        assert_eq!(Challenges::derived(b"other").verify(&proof, 7, "amy", 8, NOW), Err(ProofError::Forged));
    }

    #[test]
    fn an_unsolved_or_altered_proof_is_refused() {
        let c = Challenges::derived(b"admin-key");
        let challenge = c.issue(7, "amy", 16, NOW);
        let unsolved = (0u64..).map(|n| n.to_string()).find(|n| zero_bits(&challenge, n) < 16).unwrap();
        assert_eq!(c.verify(&format!("{challenge}:{unsolved}"), 7, "amy", 16, NOW), Err(ProofError::NotSolved));
        // Lowering the bits in the payload breaks its tag.
        let easier = challenge.replacen(":16:", ":1:", 1);
        assert_eq!(c.verify(&solve(&easier, 1), 7, "amy", 1, NOW), Err(ProofError::Forged));
        for bad in ["", "no-colon", "a.b:", &format!("{challenge}:{}", "9".repeat(65))] {
            assert!(c.verify(bad, 7, "amy", 16, NOW).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn zero_bits_are_counted_across_bytes() {
        let challenge = "c";
        let nonce = solve(challenge, 12);
        let bits = zero_bits(challenge, nonce.rsplit_once(':').unwrap().1);
        assert!(bits >= 12, "{bits}");
    }
}
