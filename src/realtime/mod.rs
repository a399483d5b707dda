//! Live progress over WebSocket (`GET /ws`).
//!
//! - [`hub`]: who follows which job; the Dispatcher publishes changes into it.
//! - [`outbox`]: the per-connection buffer the Dispatcher writes job snapshots into without ever
//!   waiting: progress is coalesced to the latest value, status changes are all kept, so a slow
//!   client costs bounded memory and never slows anyone else.
//! - [`ws`]: the connection task: subscribe/unsubscribe frames, heartbeat, idle timeout, frame
//!   size limit, subscription cap, optional Origin allowlist.

pub mod hub;
pub mod outbox;
pub mod ws;

pub use hub::Hub;
pub use outbox::Outbox;
pub use ws::WsSettings;
