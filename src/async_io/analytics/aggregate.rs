//! What the analytics actor counts, in bounded memory whatever clients send: a fixed number of
//! names (the rest under [`OTHER`]), a fixed number of minutes, and unique users as a
//! HyperLogLog sketch (exact for small counts, about 1.6 % error for large ones, a few KiB).

use std::collections::{BTreeMap, HashMap};

use cardinality_estimator::CardinalityEstimator;
use serde::Serialize;

use super::event::{minute_text, Event};

/// The name counted for events past the distinct-name limit.
pub const OTHER: &str = "(other)";

/// Limits on what is remembered.
#[derive(Clone, Copy, Debug)]
pub struct AggregateLimits {
    /// Distinct names counted one by one.
    pub max_names: usize,
    /// Minutes kept in `per_minute`; the oldest minute goes first.
    pub max_minutes: usize,
}

pub struct Aggregate {
    limits: AggregateLimits,
    total: u64,
    by_name: HashMap<String, u64>,
    users: CardinalityEstimator<str>,
    per_minute: BTreeMap<i64, u64>,
}

/// `GET /analytics/summary`, less the delivery counters the actor adds.
#[derive(Debug, Serialize)]
pub struct Counts {
    pub total: u64,
    pub by_name: BTreeMap<String, u64>,
    pub unique_users: u64,
    pub per_minute: Vec<MinuteCount>,
}

#[derive(Debug, Serialize)]
pub struct MinuteCount {
    pub minute: String,
    pub count: u64,
}

impl Aggregate {
    pub fn new(limits: AggregateLimits) -> Self {
        Aggregate {
            limits,
            total: 0,
            by_name: HashMap::new(),
            users: CardinalityEstimator::new(),
            per_minute: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, event: &Event) {
        self.total += 1;
        if let Some(n) = self.by_name.get_mut(&event.name) {
            *n += 1;
        } else if self.by_name.len() < self.limits.max_names {
            self.by_name.insert(event.name.clone(), 1);
        } else {
            *self.by_name.entry(OTHER.to_string()).or_default() += 1;
        }
        if let Some(user) = &event.user {
            self.users.insert(user.as_str());
        }
        *self.per_minute.entry(event.minute()).or_default() += 1;
        while self.per_minute.len() > self.limits.max_minutes.max(1) {
            self.per_minute.pop_first();
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            total: self.total,
            by_name: self.by_name.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            unique_users: self.users.estimate() as u64,
            per_minute: self
                .per_minute
                .iter()
                .map(|(minute, count)| MinuteCount { minute: minute_text(*minute), count: *count })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::async_io::analytics::event::parse_events;

    fn event(name: &str, user: Option<&str>, timestamp: &str) -> Event {
        let mut body = json!({"name": name, "timestamp": timestamp});
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        parse_events(body, 1, 1 << 20).unwrap().remove(0)
    }

    #[test]
    fn counts_names_users_and_minutes() {
        let mut agg = Aggregate::new(AggregateLimits { max_names: 10, max_minutes: 10 });
        agg.add(&event("view", Some("u1"), "2026-11-21T10:00:01Z"));
        agg.add(&event("view", Some("u1"), "2026-11-21T10:00:59Z"));
        agg.add(&event("click", Some("u2"), "2026-11-21T10:01:00Z"));
        agg.add(&event("click", None, "2026-11-21T10:03:00Z"));
        let c = agg.counts();
        assert_eq!(c.total, 4);
        assert_eq!(c.by_name["view"], 2);
        assert_eq!(c.by_name["click"], 2);
        assert_eq!(c.unique_users, 2);
        let minutes: Vec<(&str, u64)> = c.per_minute.iter().map(|m| (m.minute.as_str(), m.count)).collect();
        assert_eq!(minutes, [("2026-11-21T10:00:00Z", 2), ("2026-11-21T10:01:00Z", 1), ("2026-11-21T10:03:00Z", 1)]);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut agg = Aggregate::new(AggregateLimits { max_names: 3, max_minutes: 2 });
        for i in 0..10 {
            agg.add(&event(&format!("n{i}"), None, &format!("2026-11-21T10:0{i}:00Z")));
        }
        let c = agg.counts();
        assert_eq!(c.total, 10);
        assert_eq!(c.by_name.len(), 4, "three names and (other)");
        assert_eq!(c.by_name[OTHER], 7);
        assert_eq!(c.per_minute.len(), 2);
        assert_eq!(c.per_minute[1].minute, "2026-11-21T10:09:00Z", "the newest minutes are kept");
    }

    #[test]
    fn unique_users_are_estimated_closely() {
        let mut agg = Aggregate::new(AggregateLimits { max_names: 1, max_minutes: 1 });
        for i in 0..50_000 {
            let user = format!("user-{}", i % 20_000);
            agg.add(&event("e", Some(&user), "2026-11-21T10:00:00Z"));
        }
        let estimate = agg.counts().unique_users as f64;
        assert!((estimate - 20_000.0).abs() / 20_000.0 < 0.05, "{estimate}");
    }
}
