//! Buyers signed in with an identity provider: RS256 and ES256 tokens
//! checked against the provider's JWKS (a file, then a URL), beside the
//! local HS256 tokens; expired, not-yet-valid, forged, wrong-issuer,
//! wrong-audience and wrong-algorithm tokens refused; a rotated key taken
//! on its first token and a withdrawn one refused. The provider's keys are
//! test fixtures (`tests/fixtures/idp/`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Ingress;
use dropline_testkit::{eventually, http};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "dropline-buyer";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idp").join(name)
}

fn published(kids: &[&str]) -> Value {
    let all: Value = serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap()).unwrap();
    json!({ "keys": kids.iter().map(|k| all[k].clone()).collect::<Vec<_>>() })
}

fn claims(sub: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300 })
}

/// A token signed with the fixture key `kid`, whose header says `alg`.
fn signed(kid: &str, alg: Algorithm, claims: &Value) -> String {
    let der = std::fs::read(fixture(&format!("{kid}.der"))).unwrap();
    let key = if kid.starts_with("ec") { EncodingKey::from_ec_der(&der) } else { EncodingKey::from_rsa_der(&der) };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    encode(&header, claims, &key).unwrap()
}

/// Unpadded base64url, as JWTs are written.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// How the ingress takes a buyer's token: 404 for an intent nobody has
/// (the token was good), 401 when it was not.
async fn answer(stack: &Ingress, token: &str) -> StatusCode {
    let url = format!("{}/v1/intents/{}", stack.api, uuid::Uuid::new_v4());
    http().get(url).bearer_auth(token).send().await.unwrap().status()
}

async fn start(jwks_location: &str) -> Ingress {
    Ingress::start(&[
        format!("--jwks-url={jwks_location}"),
        format!("--jwks-issuer={ISSUER}"),
        format!("--jwks-audience={AUDIENCE}"),
        "--jwks-refresh-secs=1".into(),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_tokens_are_checked_against_its_published_keys_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("dropline-jwks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, published(&["rsa-1", "ec-2"]).to_string()).unwrap();
    let stack = start(jwks.to_str().unwrap()).await;
    let ok = StatusCode::NOT_FOUND;
    let refused = StatusCode::UNAUTHORIZED;

    // Both kinds of provider key, and the local HS256 tokens beside them.
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &claims("idp|ann"))).await, ok);
    assert_eq!(answer(&stack, &signed("ec-2", Algorithm::ES256, &claims("idp|bob"))).await, ok);
    assert_eq!(answer(&stack, &stack.token("local-cy")).await, ok);
    let mut listed = claims("idp|dee");
    listed["aud"] = json!(["storefront", AUDIENCE]);
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &listed)).await, ok, "aud as a list");

    // Time: expired, within the leeway, not yet valid.
    let now = chrono::Utc::now().timestamp();
    let at = |field: &str, value: i64| {
        let mut c = claims("idp|ann");
        c[field] = json!(value);
        signed("rsa-1", Algorithm::RS256, &c)
    };
    assert_eq!(answer(&stack, &at("exp", now - 120)).await, refused, "expired");
    assert_eq!(answer(&stack, &at("exp", now - 10)).await, ok, "expired within the leeway");
    assert_eq!(answer(&stack, &at("nbf", now + 120)).await, refused, "not yet valid");
    // Whose and for whom.
    let mut other = claims("idp|ann");
    other["iss"] = json!("https://evil.test/");
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &other)).await, refused, "another issuer");
    let mut other = claims("idp|ann");
    other["aud"] = json!("someone-else");
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &other)).await, refused, "another audience");
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &claims("no spaces allowed"))).await, refused);

    // Forged: no signature at all, HS256 "signed" with the RSA public key,
    // a key used with an algorithm it is not for, a tampered body.
    let b64 = |v: &Value| base64url(v.to_string().as_bytes());
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})), b64(&claims("idp|ann")));
    assert_eq!(answer(&stack, &none).await, refused, "alg none");
    let public = std::fs::read(fixture("rsa-1.pub.pem")).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = encode(&header, &claims("idp|ann"), &EncodingKey::from_secret(&public)).unwrap();
    assert_eq!(answer(&stack, &confused).await, refused, "HS256 with the public key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("ec-2".into());
    let rsa = EncodingKey::from_rsa_der(&std::fs::read(fixture("rsa-1.der")).unwrap());
    let wrong_alg = encode(&header, &claims("idp|ann"), &rsa).unwrap();
    assert_eq!(answer(&stack, &wrong_alg).await, refused, "RS256 under an ES256 key's kid");
    let good = signed("rsa-1", Algorithm::RS256, &claims("idp|ann"));
    let mut parts: Vec<&str> = good.split('.').collect();
    let tampered_body = b64(&claims("idp|admin"));
    parts[1] = &tampered_body;
    assert_eq!(answer(&stack, &parts.join(".")).await, refused, "a body the signature is not of");
    let mut no_kid = Header::new(Algorithm::RS256);
    no_kid.kid = None;
    let kidless = encode(&no_kid, &claims("idp|ann"), &rsa).unwrap();
    assert_eq!(answer(&stack, &kidless).await, refused, "no kid");

    // Rotation: a key not yet published is unknown; once the provider
    // publishes it (and withdraws the old one), its tokens work and the
    // withdrawn key's stop.
    let rotated = signed("rsa-3", Algorithm::RS256, &claims("idp|ann"));
    let r = http()
        .get(format!("{}/v1/intents/{}", stack.api, uuid::Uuid::new_v4()))
        .bearer_auth(&rotated)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), refused);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("rsa-3"), "{body}");
    std::fs::write(&jwks, published(&["rsa-3", "ec-2"]).to_string()).unwrap();
    eventually("the rotated key taken", Duration::from_secs(15), || async {
        (answer(&stack, &rotated).await == ok).then_some(())
    })
    .await;
    let withdrawn = signed("rsa-1", Algorithm::RS256, &claims("idp|ann"));
    eventually("the withdrawn key refused", Duration::from_secs(15), || async {
        (answer(&stack, &withdrawn).await == refused).then_some(())
    })
    .await;
    stack.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_can_come_from_the_providers_url() {
    // The provider's JWKS endpoint.
    let set = published(&["ec-2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let set = set.clone();
            async move { axum::Json(set) }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let stack = start(&format!("http://{addr}/.well-known/jwks.json")).await;
    assert_eq!(answer(&stack, &signed("ec-2", Algorithm::ES256, &claims("idp|eve"))).await, StatusCode::NOT_FOUND);
    assert_eq!(answer(&stack, &signed("rsa-1", Algorithm::RS256, &claims("idp|eve"))).await, StatusCode::UNAUTHORIZED);
    stack.stop().await;
    server.abort();
}
