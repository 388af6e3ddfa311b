//! The contract check: every HTTP reply and every WebSocket message the suite receives is
//! validated against the OpenAPI document the server serves (`server/openapi.json`, embedded as
//! `sanjevani::routes::OPENAPI_JSON`), so the document and the server cannot drift apart.
//!
//! An HTTP reply is looked up by method and path template (both trailing-slash forms, as the
//! server routes them); the status must be one the operation lists, documented required headers
//! must be present, the Content-Type must be one the response lists, and a JSON body must match
//! the response's schema. Paths the document does not have may only answer with its generic
//! `NotFound`, `BadRequest` (Host check) or `ServiceUnavailable` responses, and a documented path
//! asked with another method only with `MethodNotAllowed` (or those two). A WebSocket message is
//! validated against the schema its `type` maps to in `WsCustomerMessage` or `WsPharmacyMessage`.
//!
//! Schemas are validated as JSON Schema 2020-12 (OpenAPI 3.1's dialect) with formats checked: each
//! is wrapped as `{"components": <the document's components>, "allOf": [<schema>]}` so that
//! `#/components/schemas/...` references resolve. Validators are compiled once per schema.

use jsonschema::Validator;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

/// The document and the validators compiled from it so far.
struct Contract {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<Validator>>>,
}

static CONTRACT: LazyLock<Contract> = LazyLock::new(|| Contract {
    doc: serde_json::from_str(sanjevani::routes::OPENAPI_JSON).expect("server/openapi.json is not valid JSON"),
    validators: Mutex::new(HashMap::new()),
});

/// Which WebSocket endpoint a client connected to, from its path.
pub fn ws_side(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
    match path {
        "/ws/customer" => Some("WsCustomerMessage"),
        "/ws/pharmacy" => Some("WsPharmacyMessage"),
        _ => None,
    }
}

/// Checks one HTTP reply; the error says what does not match and shows the body.
pub fn check_http(
    method: &str,
    path: &str,
    status: u16,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    CONTRACT.check_http(method, path, status, headers, body).map_err(|problem| {
        let shown = String::from_utf8_lossy(&body[..body.len().min(2000)]).into_owned();
        format!("OpenAPI contract: {method} {path} → {status}: {problem}\n  body: {shown}")
    })
}

/// Checks one WebSocket message received on the endpoint whose union schema is `union`.
pub fn check_ws(union: &str, message: &Value) -> Result<(), String> {
    CONTRACT
        .check_ws(union, message)
        .map_err(|problem| format!("OpenAPI contract: {union} message: {problem}\n  message: {message}"))
}

/// RFC 6901 escaping of one JSON-pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Path segments as the server's router sees them: no empty segments, so `/a/b/` and `/a/b` match.
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

impl Contract {
    fn components(&self) -> &Value {
        &self.doc["components"]
    }

    /// The documented path template matching `path` and its path item; literal segments win
    /// over `{parameters}` when two templates match.
    fn path_item(&self, path: &str) -> Option<(&str, &Map<String, Value>)> {
        let concrete = segments(path.split('?').next().unwrap_or(""));
        let paths = self.doc["paths"].as_object()?;
        paths
            .iter()
            .filter_map(|(template, item)| {
                let parts = segments(template);
                let matches = parts.len() == concrete.len()
                    && parts.iter().zip(&concrete).all(|(t, c)| (t.starts_with('{') && t.ends_with('}')) || t == c);
                let literal = parts.iter().filter(|t| !t.starts_with('{')).count();
                Some((literal, template.as_str(), item.as_object()?)).filter(|_| matches)
            })
            .max_by_key(|(literal, _, _)| *literal)
            .map(|(_, template, item)| (template, item))
    }

    /// Follows a `$ref` to `#/components/...`, returning the target and its pointer.
    fn resolve<'a>(&'a self, value: &'a Value, pointer: String) -> Result<(&'a Value, String), String> {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let target = reference.strip_prefix('#').ok_or_else(|| format!("external $ref {reference}"))?;
                let resolved = self.doc.pointer(target).ok_or_else(|| format!("dangling $ref {reference}"))?;
                Ok((resolved, target.to_string()))
            }
            None => Ok((value, pointer)),
        }
    }

    /// The response object documented for `status` and its pointer in the document.
    fn response_for(&self, method: &str, path: &str, status: u16) -> Result<(&Value, String), String> {
        let status_key = status.to_string();
        let generic = |allowed: &[(u16, &str)], why: &str| -> Result<(&Value, String), String> {
            let name = allowed.iter().find(|(code, _)| *code == status).map(|(_, name)| *name).ok_or_else(|| {
                let codes: Vec<String> = allowed.iter().map(|(code, _)| code.to_string()).collect();
                format!("{why}: only {} may answer", codes.join(", "))
            })?;
            let pointer = format!("/components/responses/{name}");
            let response = self.doc.pointer(&pointer).ok_or_else(|| format!("the document lacks {pointer}"))?;
            Ok((response, pointer))
        };
        let Some((template, item)) = self.path_item(path) else {
            return generic(
                &[(400, "BadRequest"), (404, "NotFound"), (503, "ServiceUnavailable")],
                "the document has no such path",
            );
        };
        let verb = method.to_ascii_lowercase();
        let Some(operation) = item.get(&verb) else {
            return generic(
                &[(400, "BadRequest"), (405, "MethodNotAllowed"), (503, "ServiceUnavailable")],
                &format!("the document has no {method} on {template}"),
            );
        };
        let responses = &operation["responses"];
        let Some(response) = responses.get(&status_key) else {
            let listed: Vec<&String> = responses.as_object().map(|m| m.keys().collect()).unwrap_or_default();
            return Err(format!("status {status} is not listed for {method} {template} (listed: {listed:?})"));
        };
        let pointer = format!("/paths/{}/{verb}/responses/{status_key}", escape(template));
        self.resolve(response, pointer)
    }

    fn check_http(
        &self,
        method: &str,
        path: &str,
        status: u16,
        headers: &hyper::HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        if method.eq_ignore_ascii_case("OPTIONS") {
            // A CORS preflight is answered on every path (204, no body); the document's info says so.
            return if status == 204 && body.is_empty() {
                Ok(())
            } else {
                Err("a preflight must be an empty 204".into())
            };
        }
        let (response, pointer) = self.response_for(method, path, status)?;
        if let Some(documented) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in documented {
                let required = header.get("required").and_then(Value::as_bool).unwrap_or(false);
                if required && !headers.contains_key(name.as_str()) {
                    return Err(format!("required header {name} is missing"));
                }
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            return if body.is_empty() { Ok(()) } else { Err("the document lists no body for this response".into()) };
        };
        let content_type = headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !content.contains_key(&essence) {
            let listed: Vec<&String> = content.keys().collect();
            return Err(format!("Content-Type {content_type:?} is not one of {listed:?}"));
        }
        if essence != "application/json" || content[&essence].get("schema").is_none() {
            return Ok(());
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
        self.validate(&format!("{pointer}/content/application~1json/schema"), &value)
    }

    fn check_ws(&self, union: &str, message: &Value) -> Result<(), String> {
        let kind = message.get("type").and_then(Value::as_str).ok_or("no string `type`")?;
        let mapping = &self.components()["schemas"][union]["discriminator"]["mapping"];
        let target = mapping.get(kind).and_then(Value::as_str).ok_or_else(|| {
            let known: Vec<&String> = mapping.as_object().map(|m| m.keys().collect()).unwrap_or_default();
            format!("type {kind:?} is not one of {known:?}")
        })?;
        self.validate(target.trim_start_matches('#'), message)
    }

    /// Validates `value` against the schema at `pointer` in the document.
    fn validate(&self, pointer: &str, value: &Value) -> Result<(), String> {
        let validator = self.validator(pointer)?;
        let errors: Vec<String> =
            validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("does not match {pointer}:\n    {}", errors.join("\n    ")))
        }
    }

    fn validator(&self, pointer: &str) -> Result<Arc<Validator>, String> {
        if let Some(validator) = self.validators.lock().unwrap().get(pointer) {
            return Ok(validator.clone());
        }
        let schema = self.doc.pointer(pointer).ok_or_else(|| format!("the document has nothing at {pointer}"))?;
        let wrapper = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.components(),
            "allOf": [schema],
        });
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&wrapper)
            .map_err(|e| format!("the schema at {pointer} does not compile: {e}"))?;
        let validator = Arc::new(validator);
        self.validators.lock().unwrap().insert(pointer.to_string(), validator.clone());
        Ok(validator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Server;

    #[tokio::test]
    async fn the_document_is_served_as_json() {
        let server = Server::start().await;
        for path in ["/openapi.json", "/openapi.json/"] {
            let reply = server.get(path).go().await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.json, CONTRACT.doc, "the served document is the embedded one");
        }
        let reply = server.post("/openapi.json").go().await;
        assert_eq!((reply.status, reply.header("allow")), (405, Some("GET")));
    }

    #[test]
    fn every_schema_in_the_document_compiles() {
        let schemas = CONTRACT.components()["schemas"].as_object().unwrap();
        for name in schemas.keys() {
            CONTRACT.validator(&format!("/components/schemas/{}", escape(name))).unwrap();
        }
        for (template, item) in CONTRACT.doc["paths"].as_object().unwrap() {
            for (verb, operation) in item.as_object().unwrap() {
                for (status, response) in operation["responses"].as_object().unwrap() {
                    let pointer = format!("/paths/{}/{verb}/responses/{status}", escape(template));
                    let (response, pointer) = CONTRACT.resolve(response, pointer).unwrap();
                    if response["content"]["application/json"]["schema"].is_object() {
                        CONTRACT.validator(&format!("{pointer}/content/application~1json/schema")).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn every_object_schema_is_closed_and_lists_required() {
        fn walk(at: &str, value: &Value, open_maps: &[&str], found: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    let is_object = map.get("type") == Some(&json!("object"));
                    if is_object && !open_maps.iter().any(|p| at.starts_with(p)) {
                        if map.get("additionalProperties") != Some(&json!(false)) {
                            found.push(format!("{at}: additionalProperties is not false"));
                        }
                        if !map.get("required").is_some_and(Value::is_array) {
                            found.push(format!("{at}: no required list"));
                        }
                    }
                    for (key, child) in map {
                        walk(&format!("{at}/{}", escape(key)), child, open_maps, found);
                    }
                }
                Value::Array(items) => {
                    for (i, child) in items.iter().enumerate() {
                        walk(&format!("{at}/{i}"), child, open_maps, found);
                    }
                }
                _ => {}
            }
        }
        // The schema of the document itself describes maps (paths, components), not records.
        let mut found = Vec::new();
        walk(
            "",
            &CONTRACT.doc,
            &[
                "/components/schemas/OpenApiDocument/properties/paths",
                "/components/schemas/OpenApiDocument/properties/components/properties",
            ],
            &mut found,
        );
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn paths_match_both_slash_forms_and_prefer_literals() {
        assert_eq!(CONTRACT.path_item("/medicine/request/7").unwrap().0, "/medicine/request/{id}/");
        assert_eq!(CONTRACT.path_item("/medicine/request/7/cancel/?x=1").unwrap().0, "/medicine/request/{id}/cancel/");
        assert_eq!(CONTRACT.path_item("/login/").unwrap().0, "/login");
        assert_eq!(CONTRACT.path_item("/").unwrap().0, "/");
        assert!(CONTRACT.path_item("/no/such/path").is_none());
    }

    #[test]
    fn a_reply_that_drifts_is_caught() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        assert!(check_http("GET", "/health", 200, &headers, br#"{"status":"ok"}"#).is_ok());
        assert!(check_http("GET", "/health", 200, &headers, br#"{"status":"ok","extra":1}"#).is_err());
        assert!(check_http("GET", "/health", 418, &headers, br#"{"status":"ok"}"#).is_err());
        assert!(
            check_http("DELETE", "/login", 405, &headers, br#"{"error":"Method not allowed"}"#).is_err(),
            "no Allow"
        );
        headers.insert("allow", "POST".parse().unwrap());
        assert!(check_http("DELETE", "/login", 405, &headers, br#"{"error":"Method not allowed"}"#).is_ok());
        assert!(check_ws("WsPharmacyMessage", &json!({"type": "pong"})).is_ok());
        assert!(check_ws("WsCustomerMessage", &json!({"type": "new_request"})).is_err(), "pharmacies only");
    }
}
