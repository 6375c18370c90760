//! Bearer tokens. Buyers and admins present an HS256 JWT; its `sub` is the
//! user id. The two kinds are kept apart twice: each is signed with its own
//! secret and names its own audience (`dropline-buyer`, `dropline-admin`), so
//! neither a leaked buyer-signing secret nor a buyer token replayed at the
//! admin API grants anything there. Both carry the configured issuer. The
//! buyer secret is shared with whoever logs buyers in (the storefront, or
//! `dropctl token` locally); the admin secret only with operators' tooling.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The issuer tokens carry unless configured otherwise.
pub const DEFAULT_ISSUER: &str = "dropline";

/// Who a token is for; each audience has its own signing secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Buyer,
    Admin,
}

impl Audience {
    pub fn as_str(self) -> &'static str {
        match self {
            Audience::Buyer => "dropline-buyer",
            Audience::Admin => "dropline-admin",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    pub iss: String,
    pub aud: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token's subject is not a valid user id")]
    BadSubject,
}

/// Mints and verifies the tokens of one audience.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: Audience,
}

impl TokenKeys {
    pub fn new(secret: &[u8], issuer: &str, audience: Audience) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience.as_str()]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_owned(),
            audience,
        }
    }

    pub fn audience(&self) -> Audience {
        self.audience
    }

    /// A token for `user_id`, which must be a valid user id: a token the
    /// ingress would refuse is not minted (`dropctl token` reports it).
    pub fn mint(&self, user_id: &str, ttl_secs: i64) -> Result<String, AuthError> {
        if !is_valid_user_id(user_id) {
            return Err(AuthError::BadSubject);
        }
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id.to_owned(),
            exp: now.saturating_add(ttl_secs),
            iat: now,
            iss: self.issuer.clone(),
            aud: self.audience.as_str().to_owned(),
        };
        Ok(encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        if !is_valid_user_id(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(claims)
    }
}

/// Both kinds of token, as the ingress (and `dropctl demo`) needs them.
#[derive(Clone)]
pub struct Tokens {
    pub buyer: TokenKeys,
    pub admin: TokenKeys,
}

impl Tokens {
    pub fn new(buyer_secret: &[u8], admin_secret: &[u8], issuer: &str) -> Self {
        Self {
            buyer: TokenKeys::new(buyer_secret, issuer, Audience::Buyer),
            admin: TokenKeys::new(admin_secret, issuer, Audience::Admin),
        }
    }
}

/// What an admission token says: `sub` may buy at `event_id` until `exp`,
/// their turn out of the waiting room as `ticket`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdmissionClaims {
    pub sub: String,
    pub event_id: u64,
    pub ticket: uuid::Uuid,
    /// Seconds since the epoch; also the end of the turn.
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    pub aud: String,
}

/// The audience of admission tokens ([`AdmissionKeys`]).
pub const ADMISSION_AUDIENCE: &str = "dropline-admission";

/// Mints and verifies admission tokens. Their key is derived from the
/// admin secret (HMAC-SHA256 of a fixed label), so only the ingress, which
/// holds it, can mint one, and no further secret has to be deployed.
#[derive(Clone)]
pub struct AdmissionKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
}

impl AdmissionKeys {
    pub fn derived(admin_secret: &[u8], issuer: &str) -> Self {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(admin_secret).expect("HMAC takes a key of any length");
        mac.update(b"dropline admission tokens v1");
        let key = mac.finalize().into_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        // The turn's end is checked by the caller: a retry of a purchase
        // accepted in time is answered again after it.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[ADMISSION_AUDIENCE]);
        Self {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
            issuer: issuer.to_owned(),
        }
    }

    /// A token for `user`'s turn at `event_id`, ending at `ends_ms`.
    pub fn mint(&self, user: &str, event_id: u64, ticket: uuid::Uuid, ends_ms: i64) -> Result<String, AuthError> {
        let claims = AdmissionClaims {
            sub: user.to_owned(),
            event_id,
            ticket,
            exp: ends_ms.div_euclid(1000),
            iat: chrono::Utc::now().timestamp(),
            iss: self.issuer.clone(),
            aud: ADMISSION_AUDIENCE.to_owned(),
        };
        Ok(encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }

    /// The claims of a token this deployment minted; its `exp` is not
    /// checked here.
    pub fn verify(&self, token: &str) -> Result<AdmissionClaims, AuthError> {
        Ok(decode::<AdmissionClaims>(token, &self.decoding, &self.validation)?.claims)
    }
}

/// User ids end up in Redis hash fields and MySQL columns: keep them short
/// and printable.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(b"buyer-key", b"admin-key", DEFAULT_ISSUER)
    }

    #[test]
    fn tokens_round_trip_and_reject_a_foreign_secret() {
        let keys = tokens();
        let t = keys.buyer.mint("alice", 60).unwrap();
        let claims = keys.buyer.verify(&t).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.iss.as_str(), claims.aud.as_str()),
            ("alice", "dropline", "dropline-buyer")
        );
        assert!(TokenKeys::new(b"other", DEFAULT_ISSUER, Audience::Buyer).verify(&t).is_err());
        let admin = keys.admin.mint("ops", 60).unwrap();
        assert_eq!(keys.admin.verify(&admin).unwrap().aud, "dropline-admin");
    }

    #[test]
    fn buyer_and_admin_tokens_do_not_cross() {
        let keys = tokens();
        assert!(keys.admin.verify(&keys.buyer.mint("alice", 60).unwrap()).is_err());
        assert!(keys.buyer.verify(&keys.admin.mint("ops", 60).unwrap()).is_err());
        // Even signed with the right secret, the audience must match: a
        // deployment that (wrongly) shares one secret still keeps them apart.
        let same = Tokens::new(b"one-key", b"one-key", DEFAULT_ISSUER);
        assert!(same.admin.verify(&same.buyer.mint("alice", 60).unwrap()).is_err());
        assert!(same.buyer.verify(&same.admin.mint("ops", 60).unwrap()).is_err());
    }

    #[test]
    fn tokens_the_ingress_would_refuse_are_not_minted() {
        let keys = tokens();
        for bad in ["", "has space", "caf\u{e9}", &"u".repeat(129)] {
            assert!(matches!(keys.buyer.mint(bad, 60), Err(AuthError::BadSubject)), "{bad:?}");
        }
        assert!(keys.buyer.mint(&"u".repeat(128), 60).is_ok());
    }

    #[test]
    fn the_issuer_is_checked() {
        let theirs = Tokens::new(b"buyer-key", b"admin-key", "someone-else");
        assert!(tokens().buyer.verify(&theirs.buyer.mint("alice", 60).unwrap()).is_err());
    }

    #[test]
    fn tokens_without_issuer_or_audience_are_refused() {
        #[derive(Serialize)]
        struct Old<'a> {
            sub: &'a str,
            exp: i64,
            scope: &'a str,
        }
        let exp = chrono::Utc::now().timestamp() + 60;
        let old = encode(
            &Header::new(Algorithm::HS256),
            &Old { sub: "ops", exp, scope: "admin" },
            &EncodingKey::from_secret(b"admin-key"),
        )
        .unwrap();
        assert!(tokens().admin.verify(&old).is_err());
    }

    #[test]
    fn admission_tokens_are_the_ingress_own_and_carry_their_turn() {
        let keys = AdmissionKeys::derived(b"admin-key", DEFAULT_ISSUER);
        let ticket = uuid::Uuid::from_u128(7);
        let token = keys.mint("alice", 12, ticket, 1_700_000_000_999).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.event_id, claims.ticket, claims.exp),
            ("alice", 12, ticket, 1_700_000_000)
        );
        // Another admin secret, or a buyer or admin token: not an admission.
        assert!(AdmissionKeys::derived(b"other-key", DEFAULT_ISSUER).verify(&token).is_err());
        assert!(keys.verify(&tokens().buyer.mint("alice", 60).unwrap()).is_err());
        assert!(keys.verify(&tokens().admin.mint("alice", 60).unwrap()).is_err());
        // Nor is an admission a bearer token, even signed with the key it
        // is derived from.
        assert!(tokens().admin.verify(&token).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = tokens();
        let t = keys.buyer.mint("alice", -60).unwrap();
        assert!(keys.buyer.verify(&t).is_err());
    }
}
