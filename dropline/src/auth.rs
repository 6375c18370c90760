//! Bearer tokens. Buyers and admins present an HS256 JWT; its `sub` is the
//! user id. The signing secret is shared with whoever issues tokens (the
//! storefront's login, or `dropctl token` locally).

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The scope that grants the admin API.
pub const ADMIN_SCOPE: &str = "admin";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.scope.split(' ').any(|s| s == ADMIN_SCOPE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token's subject is not a valid user id")]
    BadSubject,
}

#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    pub fn mint(&self, user_id: &str, ttl_secs: i64, scope: &str) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims { sub: user_id.to_owned(), exp: now + ttl_secs, iat: now, scope: scope.to_owned() };
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

/// User ids end up in Redis hash fields and MySQL columns: keep them short
/// and printable.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_a_foreign_secret() {
        let keys = TokenKeys::new(b"s1");
        let t = keys.mint("alice", 60, "").unwrap();
        assert_eq!(keys.verify(&t).unwrap().sub, "alice");
        assert!(!keys.verify(&t).unwrap().is_admin());
        assert!(TokenKeys::new(b"s2").verify(&t).is_err());
        let admin = keys.mint("ops", 60, "admin").unwrap();
        assert!(keys.verify(&admin).unwrap().is_admin());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = TokenKeys::new(b"s1");
        let t = keys.mint("alice", -60, "").unwrap();
        assert!(keys.verify(&t).is_err());
    }
}
