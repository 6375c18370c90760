//! Buyers signed in with an identity provider: RS256 or ES256 JWTs whose
//! public keys the provider publishes as a JWKS, read from a file or an
//! http(s) URL. A token names its key by `kid`; each key is pinned to the
//! one algorithm it was published for (from its `alg`, or its type: RSA is
//! RS256, P-256 is ES256), so a token cannot pick another (`none`, or HS256
//! "signed" with a public key). `exp`, `nbf`, `iss` and `aud` are checked
//! with a small leeway.
//!
//! Keys rotate: the set is read again every `DROPLINE_JWKS_REFRESH_SECS`,
//! and at once (at most every few seconds) when a token names a key it does
//! not have, so a provider's new key works from its first token and a
//! withdrawn one stops at the next read. The shared-secret HS256 tokens
//! (the local stack's) keep working beside these.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dropline::auth::{is_valid_user_id, Claims};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// A token naming an unknown key reads the set again at most this often.
const UNKNOWN_KID_REREAD: Duration = Duration::from_secs(5);

/// Where the provider's keys are.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Url(String),
}

struct Key {
    alg: Algorithm,
    decoding: DecodingKey,
}

/// The provider's keys, and what its tokens must say.
pub struct Jwks {
    source: Source,
    issuer: String,
    audience: String,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    /// When the set was last read (or tried).
    read_at: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {0}: {1}")]
    File(String, std::io::Error),
    #[error("fetching {0}: {1}")]
    Fetch(String, reqwest::Error),
    #[error("not a JWKS: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Why a provider's token was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the token names no key (kid)")]
    NoKid,
    #[error("the token's key {0:?} is not one the identity provider publishes")]
    UnknownKid(String),
    #[error("the token's algorithm is not the one its key is for")]
    WrongAlgorithm,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("the token's subject is not a valid user id")]
    BadSubject,
}

/// The claims Dropline reads from a provider's token (`aud` is checked by
/// the validation, as a string or a list).
#[derive(Deserialize)]
struct ProviderClaims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: i64,
    iss: String,
}

impl Jwks {
    /// `location` is a file path or an http(s) URL.
    pub fn new(location: &str, issuer: &str, audience: &str, http: reqwest::Client) -> Self {
        let source = if location.starts_with("http://") || location.starts_with("https://") {
            Source::Url(location.to_owned())
        } else {
            Source::File(PathBuf::from(location))
        };
        Self {
            source,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            http,
            keys: RwLock::default(),
            read_at: tokio::sync::Mutex::new(None),
        }
    }

    /// Reads the set again; the number of usable keys in it. A set that
    /// cannot be read leaves the keys as they were.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let mut read_at = self.read_at.lock().await;
        *read_at = Some(Instant::now());
        self.read_set().await
    }

    async fn read_set(&self) -> Result<usize, JwksError> {
        let raw = match &self.source {
            Source::File(path) => {
                tokio::fs::read(path).await.map_err(|e| JwksError::File(path.display().to_string(), e))?
            }
            Source::Url(url) => {
                let fetch = |e| JwksError::Fetch(url.clone(), e);
                let r = self.http.get(url).send().await.and_then(|r| r.error_for_status()).map_err(fetch)?;
                r.bytes().await.map_err(fetch)?.to_vec()
            }
        };
        let keys = usable_keys(&serde_json::from_slice(&raw)?);
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(n)
    }

    /// Whether the keys are read from a file (which must be readable at
    /// start), not a URL (which may be down for a while).
    pub fn is_file(&self) -> bool {
        matches!(self.source, Source::File(_))
    }

    fn key(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).get(kid).cloned()
    }

    /// Checks a provider's token (whose header is `header`); its claims.
    pub async fn verify(&self, token: &str, header: &Header) -> Result<Claims, IdentityError> {
        let kid = header.kid.as_deref().ok_or(IdentityError::NoKid)?;
        let key = match self.key(kid) {
            Some(key) => key,
            None => {
                // A key the provider may have added since the last read.
                // One read at a time: the others wait for it, then look.
                let mut read_at = self.read_at.lock().await;
                let due = read_at.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_REREAD);
                if self.key(kid).is_none() && due {
                    *read_at = Some(Instant::now());
                    if let Err(e) = self.read_set().await {
                        tracing::warn!(error = %e, "could not read the identity provider's keys");
                    }
                }
                drop(read_at);
                self.key(kid).ok_or_else(|| IdentityError::UnknownKid(kid.to_owned()))?
            }
        };
        if header.alg != key.alg {
            return Err(IdentityError::WrongAlgorithm);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        let claims = decode::<ProviderClaims>(token, &key.decoding, &validation)?.claims;
        if !is_valid_user_id(&claims.sub) {
            return Err(IdentityError::BadSubject);
        }
        Ok(Claims { sub: claims.sub, exp: claims.exp, iat: claims.iat, iss: claims.iss, aud: self.audience.clone() })
    }

    /// Reads the set every `every` until shutdown.
    pub async fn keep_fresh(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        dropline::shutdown::every(every, &shutdown, || async {
            match self.refresh().await {
                Ok(n) => tracing::debug!(keys = n, "identity provider's keys read"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the identity provider's keys; keeping the last ones")
                }
            }
        })
        .await;
    }
}

/// The signing keys of a set that Dropline accepts, each with its one
/// algorithm: RS256 and ES256 keys with a `kid`. Others are skipped.
fn usable_keys(set: &JwkSet) -> HashMap<String, Arc<Key>> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else { continue };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), Some(KeyAlgorithm::RS256) | None) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), Some(KeyAlgorithm::ES256) | None)
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                tracing::debug!(kid, "identity provider key skipped: not an RS256 or ES256 signing key");
                continue;
            }
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(decoding) => {
                keys.insert(kid.clone(), Arc::new(Key { alg, decoding }));
            }
            Err(e) => tracing::warn!(kid, error = %e, "identity provider key skipped: unreadable"),
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rs256_and_es256_signing_keys_with_a_kid_are_kept() {
        // The test provider's keys (tests/fixtures/idp), and variants of them.
        let published: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/idp/jwks.json")).unwrap();
        let variant = |kid: &str, change: &dyn Fn(&mut serde_json::Value)| {
            let mut key = published[kid].clone();
            change(&mut key);
            key
        };
        let set: JwkSet = serde_json::from_value(serde_json::json!({ "keys": [
            variant("rsa-1", &|k| { k["kid"] = "r".into(); k.as_object_mut().unwrap().remove("alg"); }),
            variant("rsa-1", &|k| { k["kid"] = "r-enc".into(); k["use"] = "enc".into(); }),
            variant("rsa-1", &|k| { k["kid"] = "r-ps".into(); k["alg"] = "PS256".into(); }),
            variant("rsa-1", &|k| { k.as_object_mut().unwrap().remove("kid"); }),
            { "kty": "oct", "kid": "secret", "k": "c2VjcmV0" },
            variant("ec-2", &|k| { k["kid"] = "e".into(); }),
            variant("ec-2", &|k| { k["kid"] = "e384".into(); k["crv"] = "P-384".into(); k.as_object_mut().unwrap().remove("alg"); }),
        ]}))
        .unwrap();
        let keys = usable_keys(&set);
        let mut kept: Vec<(&str, Algorithm)> = keys.iter().map(|(k, v)| (k.as_str(), v.alg)).collect();
        kept.sort_by_key(|(k, _)| *k);
        assert_eq!(kept, [("e", Algorithm::ES256), ("r", Algorithm::RS256)]);
    }
}
