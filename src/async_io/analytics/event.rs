//! Analytics events as clients send them, parsed into [`Event`]s that are valid by construction.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Characters allowed in an event name.
pub const MAX_NAME_CHARS: usize = 128;
/// Characters allowed in a user id.
pub const MAX_USER_CHARS: usize = 256;

/// One event: a name, optionally who did it, free-form properties and when it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub properties: Map<String, Value>,
    /// When it happened: the client's timestamp, else when the service received it (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: OffsetDateTime,
    /// About how many bytes it holds (its name, user and properties as JSON): what the
    /// hand-off queue counts.
    #[serde(skip)]
    pub bytes: usize,
}

/// Why a request's events were refused (the whole request is refused: none are taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EventError {
    pub code: &'static str,
    pub message: String,
}

/// One event as sent. Unknown fields are refused so typos do not go unnoticed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    name: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    properties: Option<Value>,
    #[serde(default)]
    timestamp: Option<String>,
}

impl Event {
    /// An event the service records about itself.
    pub fn internal(name: &str, properties: Map<String, Value>) -> Self {
        let bytes = name.len() + json_len(&properties) + 64;
        Event { name: name.to_string(), user: None, properties, timestamp: now(), bytes }
    }

    /// Whole minutes since the Unix epoch of [`Event::timestamp`].
    pub fn minute(&self) -> i64 {
        self.timestamp.unix_timestamp().div_euclid(60)
    }
}

/// Parses a request body: one event object, or an array of 1 to `max_batch` of them.
pub fn parse_events(body: Value, max_batch: usize, max_properties: usize) -> Result<Vec<Event>, EventError> {
    let received = now();
    match body {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(invalid("no_events", "the array is empty: send at least one event".into()));
            }
            if items.len() > max_batch {
                let n = items.len();
                return Err(invalid("too_many_events", format!("{n} events in one request, the limit is {max_batch}")));
            }
            let parse = |(i, item)| parse_one(item, &format!("[{i}]"), received, max_properties);
            items.into_iter().enumerate().map(parse).collect()
        }
        item @ Value::Object(_) => Ok(vec![parse_one(item, "", received, max_properties)?]),
        _ => Err(invalid("invalid_event", "send an event object or an array of event objects".into())),
    }
}

fn parse_one(item: Value, at: &str, received: OffsetDateTime, max_properties: usize) -> Result<Event, EventError> {
    if !item.is_object() {
        return Err(invalid("invalid_event", format!("{at}: an event must be a JSON object")));
    }
    let raw: RawEvent = serde_json::from_value(item).map_err(|e| invalid("invalid_event", format!("{at}: {e}")))?;
    let name = raw.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_event",
            format!("{at}.name: 1 to {MAX_NAME_CHARS} characters, no control characters"),
        ));
    }
    if let Some(user) = &raw.user {
        if user.is_empty() || user.chars().count() > MAX_USER_CHARS {
            return Err(invalid("invalid_event", format!("{at}.user: 1 to {MAX_USER_CHARS} characters")));
        }
    }
    let properties = match raw.properties {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("invalid_event", format!("{at}.properties: must be a JSON object"))),
    };
    let properties_bytes = json_len(&properties);
    if properties_bytes > max_properties {
        return Err(invalid(
            "invalid_event",
            format!("{at}.properties: {properties_bytes} bytes as JSON, the limit is {max_properties}"),
        ));
    }
    let timestamp = match raw.timestamp {
        None => received,
        Some(text) => OffsetDateTime::parse(&text, &Rfc3339)
            .map_err(|_| invalid("invalid_event", format!("{at}.timestamp: `{text}` is not an RFC 3339 date-time")))?,
    };
    let bytes = name.len() + raw.user.as_ref().map_or(0, String::len) + properties_bytes + 64;
    Ok(Event { name: name.to_string(), user: raw.user, properties, timestamp, bytes })
}

/// How long `value` is as compact JSON, counted without building the text.
fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

fn invalid(code: &'static str, message: String) -> EventError {
    EventError { code, message }
}

fn now() -> OffsetDateTime {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    OffsetDateTime::from_unix_timestamp_nanos(since.as_nanos() as i128).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// RFC 3339 text of a minute number, e.g. `2026-11-21T10:15:00Z`.
pub fn minute_text(minute: i64) -> String {
    OffsetDateTime::from_unix_timestamp(minute.saturating_mul(60))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = t.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn one_event_or_an_array() {
        let one = parse_events(json!({"name": "page_view"}), 10, 1 << 20).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "page_view");
        assert!(one[0].properties.is_empty());
        let many = parse_events(
            json!([
                {"name": "a", "user": "u1", "properties": {"k": 1}, "timestamp": "2026-11-21T10:15:30+02:00"},
                {"name": "b", "properties": null}
            ]),
            10,
            1 << 20,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].user.as_deref(), Some("u1"));
        assert_eq!(many[0].properties["k"], 1);
        assert_eq!(minute_text(many[0].minute()), "2026-11-21T08:15:00Z", "offsets are honoured");
    }

    #[test]
    fn forwarded_form_has_a_timestamp() {
        let e =
            parse_events(json!({"name": "a", "timestamp": "2026-01-02T03:04:05.678Z"}), 1, 1 << 20).unwrap().remove(0);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v, json!({"name": "a", "properties": {}, "timestamp": "2026-01-02T03:04:05.678Z"}));
    }

    #[test]
    fn bad_events_are_refused_with_where_and_why() {
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        let cases = [
            (json!([]), "no_events", "the array"),
            (json!([{"name": "a"}, {"name": "b"}, {"name": "c"}]), "too_many_events", "3 events"),
            (json!("page_view"), "invalid_event", "send an event"),
            (json!(42), "invalid_event", "send an event"),
            (json!({}), "invalid_event", ": missing field `name`"),
            (json!({"name": ""}), "invalid_event", ".name"),
            (json!({"name": "  "}), "invalid_event", ".name"),
            (json!({"name": long}), "invalid_event", ".name"),
            (json!({"name": "a\nb"}), "invalid_event", ".name"),
            (json!({"name": 5}), "invalid_event", ": invalid type"),
            (json!({"name": "a", "user": ""}), "invalid_event", ".user"),
            (json!({"name": "a", "user": 7}), "invalid_event", ": invalid type"),
            (json!({"name": "a", "properties": [1]}), "invalid_event", ".properties"),
            (json!({"name": "a", "timestamp": "yesterday"}), "invalid_event", ".timestamp"),
            (json!({"name": "a", "timestamp": "2026-13-01T00:00:00Z"}), "invalid_event", ".timestamp"),
            (json!({"name": "a", "nmae": "b"}), "invalid_event", "unknown field `nmae`"),
            (json!([{"name": "a"}, 3]), "invalid_event", "[1]: an event must be"),
            (json!([{"name": "a"}, {"name": ""}]), "invalid_event", "[1].name"),
            (
                json!({"name": "a", "properties": {"k": "x".repeat(2 << 20)}}),
                "invalid_event",
                ".properties: 2097160 bytes",
            ),
        ];
        for (body, code, text) in cases {
            let err = parse_events(body.clone(), 2, 1 << 20).expect_err(&body.to_string());
            assert_eq!(err.code, code, "{body}: {}", err.message);
            assert!(err.message.contains(text), "{body}: {}", err.message);
        }
    }
}
