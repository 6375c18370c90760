//! `docs/openapi.json` against the code: the routes the router declares
//! and the paths the document has are the same, every error code is in it,
//! and real answers of a running ingress (on the real Redis, MariaDB and
//! broker) validate against the schemas it gives for them.

mod common;

use std::collections::BTreeSet;

use common::Ingress;
use dropline_ingress::problem::ErrorCode;
use dropline_testkit::{event_body, http};
use serde_json::{json, Value};

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

fn document() -> Value {
    serde_json::from_str(&repo_file("docs/openapi.json")).expect("docs/openapi.json is JSON")
}

/// `(method, path)` of every `.route(...)` in the router's source.
fn routes_in_code() -> BTreeSet<(String, String)> {
    let source = repo_file("ingress/src/routes/mod.rs");
    let mut routes = BTreeSet::new();
    for (start, _) in source.match_indices(".route(\"") {
        let rest = &source[start + ".route(\"".len()..];
        let path = &rest[..rest.find('"').unwrap()];
        // The route's arguments: up to the parenthesis that closes it.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .unwrap()
            .0;
        let args = &rest[..end];
        for method in ["get", "post", "put", "patch", "delete"] {
            if args.contains(&format!("{method}(")) || args.contains(&format!(".{method}(")) {
                routes.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    routes
}

fn routes_in_document(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

#[test]
fn the_document_has_every_route_and_no_other() {
    let (code, doc) = (routes_in_code(), routes_in_document(&document()));
    assert!(code.len() >= 20, "the router's source was read: {code:?}");
    let missing: Vec<_> = code.difference(&doc).collect();
    let extra: Vec<_> = doc.difference(&code).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not in the document: {missing:?}; not in the code: {extra:?}");
}

#[test]
fn the_document_lists_every_error_code() {
    let doc = document();
    let listed: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let codes: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(listed, codes);
    // Every code an error answer names is one, and every code but the
    // ones any route can answer is named by some route.
    let mut named = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.as_str() < "400" {
                    continue;
                }
                let description = response["description"].as_str().unwrap();
                for quoted in description.split('`').skip(1).step_by(2) {
                    if quoted.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        assert!(codes.contains(quoted), "{status} names {quoted:?}, which is no error code");
                        named.insert(quoted);
                    }
                }
            }
        }
    }
    let anywhere = ["internal", "method_not_allowed", "not_found", "invalid_path", "payload_too_large"];
    let unnamed: Vec<_> = codes.iter().filter(|c| !named.contains(*c) && !anywhere.contains(c)).collect();
    assert!(unnamed.is_empty(), "codes no route's answers name: {unnamed:?}");
}

/// Every way `value` fails `schema` (the subset of JSON Schema the
/// document uses), with where.
fn violations(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let name = target.strip_prefix("#/components/schemas/").expect("a local schema");
        return violations(doc, &doc["components"]["schemas"][name], value, at, out);
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let fits = options.iter().filter(|o| {
            let mut v = Vec::new();
            violations(doc, o, value, at, &mut v);
            v.is_empty()
        });
        if fits.count() != 1 {
            out.push(format!("{at}: not exactly one of the oneOf schemas"));
        }
        return;
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("type {other} in the document"),
        };
        if !ok {
            out.push(format!("{at}: {value} is not a {kind}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            out.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_i64), value.as_i64()) {
        if n < min {
            out.push(format!("{at}: {n} < {min}"));
        }
    }
    match (schema.get("format").and_then(Value::as_str), value.as_str()) {
        (Some("date-time"), Some(s)) if chrono::DateTime::parse_from_rfc3339(s).is_err() => {
            out.push(format!("{at}: {s} is not a date-time"))
        }
        (Some("uuid"), Some(s)) if uuid::Uuid::parse_str(s).is_err() => out.push(format!("{at}: {s} is not a uuid")),
        _ => {}
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                out.push(format!("{at}: {required} is missing"));
            }
        }
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => violations(doc, s, v, &format!("{at}.{key}"), out),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    out.push(format!("{at}: {key} is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            violations(doc, items, v, &format!("{at}[{i}]"), out);
        }
    }
}

/// Sends `request` (for the document's `path` and `method`) and checks the
/// answer against what the document says of its status; its body.
async fn conforms(doc: &Value, method: &str, path: &str, request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {path} answered {status}, which the document does not list: {body}");
    let content = response["content"].as_object().unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
    let (media, schema) = content.iter().next().unwrap();
    assert!(content_type.starts_with(media.as_str()), "{method} {path} {status}: {content_type}, not {media}");
    let mut out = Vec::new();
    violations(doc, &schema["schema"], &body, "$", &mut out);
    assert!(out.is_empty(), "{method} {path} {status}: {out:#?}\n{body:#}");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_validate_against_the_document() {
    let doc = document();
    let stack = Ingress::start(&[]).await;
    let (api, admin, buyer) = (stack.api.clone(), stack.admin_token(), stack.token("spec-buyer"));
    let http = http();

    let (_, created) = conforms(
        &doc,
        "post",
        "/v1/admin/events",
        http.post(format!("{api}/v1/admin/events")).bearer_auth(&admin).json(&event_body(-5)),
    )
    .await;
    let event = created["id"].as_u64().unwrap();
    conforms(&doc, "get", "/v1/events/{event_id}", http.get(format!("{api}/v1/events/{event}"))).await;
    conforms(&doc, "get", "/v1/events/{event_id}", http.get(format!("{api}/v1/events/999999"))).await;
    conforms(&doc, "get", "/v1/events", http.get(format!("{api}/v1/events?q=API&limit=5"))).await;
    conforms(&doc, "get", "/v1/events", http.get(format!("{api}/v1/events?limit=0"))).await;

    let buy = |key: &str| {
        http.post(format!("{api}/v1/events/{event}/purchases"))
            .bearer_auth(&buyer)
            .header("idempotency-key", key)
            .json(&json!({"quantity": 1}))
    };
    let (status, accepted) = conforms(&doc, "post", "/v1/events/{event_id}/purchases", buy("spec-1")).await;
    assert_eq!(status, 202);
    let no_key =
        http.post(format!("{api}/v1/events/{event}/purchases")).bearer_auth(&buyer).json(&json!({"quantity": 1}));
    conforms(&doc, "post", "/v1/events/{event_id}/purchases", no_key).await;
    let intent = accepted["intent_id"].as_str().unwrap();
    conforms(
        &doc,
        "get",
        "/v1/intents/{intent_id}",
        http.get(format!("{api}/v1/intents/{intent}")).bearer_auth(&buyer),
    )
    .await;
    let nobody = uuid::Uuid::new_v4();
    conforms(&doc, "get", "/v1/orders/{order_id}", http.get(format!("{api}/v1/orders/{nobody}")).bearer_auth(&buyer))
        .await;
    conforms(&doc, "get", "/v1/intents/{intent_id}", http.get(format!("{api}/v1/intents/{intent}"))).await;

    // A waiting room and its buyer's side.
    let later = stack.create_event(&event_body(7)).await;
    let room = json!({ "prequeue_opens_at": chrono::Utc::now(), "outflow_per_sec": 5, "time_to_act_secs": 30, "proof_of_work_bits": 4 });
    let set = http.put(format!("{api}/v1/admin/events/{later}/waiting-room")).bearer_auth(&admin).json(&room);
    conforms(&doc, "put", "/v1/admin/events/{event_id}/waiting-room", set).await;
    conforms(
        &doc,
        "get",
        "/v1/events/{event_id}/waiting-room",
        http.get(format!("{api}/v1/events/{later}/waiting-room")),
    )
    .await;
    conforms(
        &doc,
        "get",
        "/v1/events/{event_id}/waiting-room/draw",
        http.get(format!("{api}/v1/events/{later}/waiting-room/draw")),
    )
    .await;
    let queue = format!("{api}/v1/events/{later}/queue");
    conforms(&doc, "post", "/v1/events/{event_id}/queue", http.post(&queue).bearer_auth(&buyer)).await;
    let (_, challenge) = conforms(
        &doc,
        "get",
        "/v1/events/{event_id}/queue/challenge",
        http.get(format!("{queue}/challenge")).bearer_auth(&buyer),
    )
    .await;
    let proof = dropline::room::proof::solve(challenge["challenge"].as_str().unwrap(), 4);
    let join = http.post(&queue).bearer_auth(&buyer).header("dropline-proof", proof);
    let (status, _) = conforms(&doc, "post", "/v1/events/{event_id}/queue", join).await;
    assert_eq!(status, 201);
    conforms(&doc, "get", "/v1/events/{event_id}/queue", http.get(&queue).bearer_auth(&buyer)).await;
    let change = http
        .patch(format!("{api}/v1/admin/events/{later}/waiting-room"))
        .bearer_auth(&admin)
        .json(&json!({"outflow_per_sec": 10}));
    conforms(&doc, "patch", "/v1/admin/events/{event_id}/waiting-room", change).await;
    stack.stop().await;
}
