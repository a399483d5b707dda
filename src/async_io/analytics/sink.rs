//! Forwarding to `--analytics-sink`: a bounded buffer of serialized events, sent as JSON-array
//! batches, one batch in flight at a time, each retried with backoff until it succeeds or runs out
//! of attempts. A full buffer drops its oldest events; drops and failures are counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::async_io::backoff::Backoff;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub url: url::Url,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub buffer: usize,
    /// Most bytes held, whatever the number of events.
    pub buffer_bytes: usize,
    pub attempts: u32,
    pub timeout: Duration,
    pub backoff: Backoff,
}

/// The events waiting to be forwarded.
pub struct SinkBuffer {
    settings: SinkSettings,
    /// One serialized event each, oldest first.
    events: VecDeque<Bytes>,
    /// Bytes held in `events`.
    bytes: usize,
    /// Whether a batch is being sent (one at a time keeps the order and bounds the sink's load).
    pub in_flight: bool,
    metrics: Arc<Metrics>,
}

/// A batch on its way: the request body and how many events it carries.
pub struct Batch {
    pub body: Bytes,
    pub events: usize,
}

impl SinkBuffer {
    pub fn new(settings: SinkSettings, metrics: Arc<Metrics>) -> Self {
        SinkBuffer { settings, events: VecDeque::new(), bytes: 0, in_flight: false, metrics }
    }

    pub fn settings(&self) -> &SinkSettings {
        &self.settings
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Keeps `event` for forwarding; drops the oldest ones while the buffer is full (in events or
    /// in bytes).
    pub fn push(&mut self, event: Bytes) {
        while !self.events.is_empty()
            && (self.events.len() >= self.settings.buffer.max(1)
                || self.bytes + event.len() > self.settings.buffer_bytes)
        {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.len();
            }
            self.metrics.analytics_dropped.inc();
        }
        self.bytes += event.len();
        self.events.push_back(event);
    }

    /// Whether a full batch is waiting.
    pub fn batch_ready(&self) -> bool {
        self.events.len() >= self.settings.batch_size.max(1)
    }

    /// Takes up to one batch of the oldest events, unless a batch is already in flight.
    pub fn take_batch(&mut self) -> Option<Batch> {
        if self.in_flight || self.events.is_empty() {
            return None;
        }
        let n = self.events.len().min(self.settings.batch_size.max(1));
        let size: usize = self.events.iter().take(n).map(|e| e.len() + 1).sum();
        self.bytes -= size - n;
        let mut body = BytesMut::with_capacity(size + 1);
        body.put_u8(b'[');
        for (i, event) in self.events.drain(..n).enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&event);
        }
        body.put_u8(b']');
        self.in_flight = true;
        Some(Batch { body: body.freeze(), events: n })
    }
}

/// What became of a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    Forwarded,
    Dropped,
}

/// Sends one batch, retrying with backoff. Each failed attempt calls `on_error`.
pub async fn deliver(
    client: &awc::Client,
    settings: &SinkSettings,
    batch: &Batch,
    on_error: impl Fn(String),
) -> BatchOutcome {
    for attempt in 1..=settings.attempts.max(1) {
        let result = client
            .post(settings.url.as_str())
            .insert_header(("content-type", "application/json"))
            .send_body(batch.body.clone())
            .await;
        let retry = match result {
            Ok(resp) if resp.status().is_success() => return BatchOutcome::Forwarded,
            Ok(resp) => {
                let status = resp.status();
                on_error(format!("the sink answered {status}"));
                // Other 4xx answers mean the sink refuses this batch: trying again will not help.
                status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429
            }
            Err(e) => {
                on_error(format!("the sink could not be reached: {e}"));
                true
            }
        };
        if !retry || attempt == settings.attempts {
            break;
        }
        actix_rt::time::sleep(settings.backoff.delay(attempt)).await;
    }
    BatchOutcome::Dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(batch_size: usize, capacity: usize) -> SinkBuffer {
        let settings = SinkSettings {
            url: "http://example.com/".parse().unwrap(),
            batch_size,
            flush_interval: Duration::from_secs(1),
            buffer: capacity,
            buffer_bytes: 1 << 20,
            attempts: 3,
            timeout: Duration::from_secs(1),
            backoff: Backoff { first: Duration::from_millis(10), max: Duration::from_millis(100) },
        };
        SinkBuffer::new(settings, Arc::new(Metrics::new()))
    }

    #[test]
    fn batches_are_json_arrays_in_order_one_at_a_time() {
        let mut b = buffer(2, 10);
        for i in 0..3 {
            b.push(Bytes::from(format!("{{\"n\":{i}}}")));
        }
        assert!(b.batch_ready());
        let first = b.take_batch().unwrap();
        assert_eq!(&first.body[..], br#"[{"n":0},{"n":1}]"#);
        assert_eq!(first.events, 2);
        assert!(b.take_batch().is_none(), "one batch in flight at a time");
        b.in_flight = false;
        let second = b.take_batch().unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
        assert_eq!(parsed, serde_json::json!([{"n": 2}]));
    }

    #[test]
    fn a_buffer_full_in_bytes_drops_the_oldest_however_few_events_it_holds() {
        let mut b = buffer(100, 1000);
        b.settings.buffer_bytes = 10;
        for event in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            b.push(Bytes::copy_from_slice(event));
        }
        assert_eq!(b.len(), 2, "12 bytes do not fit in 10");
        assert_eq!(b.metrics.analytics_dropped.get(), 1);
        let batch = b.take_batch().unwrap();
        assert_eq!(&batch.body[..], b"[bbbb,cccc]");
        b.push(Bytes::from_static(b"dddddddddd"));
        assert_eq!(b.len(), 1, "the batch taken frees its bytes");
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts() {
        let mut b = buffer(100, 3);
        for i in 0..5 {
            b.push(Bytes::from(i.to_string()));
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.metrics.analytics_dropped.get(), 2);
        assert_eq!(&b.take_batch().unwrap().body[..], b"[2,3,4]");
    }
}
