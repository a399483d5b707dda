//! Live progress over WebSocket (`GET /ws`).
//!
//! - [`outbox`]: the per-connection buffer the Dispatcher writes job snapshots into without ever
//!   waiting: progress is coalesced to the latest value, status changes are all kept, so a slow
//!   client costs bounded memory and never slows anyone else.
//! - [`ws`]: the connection task: subscribe/unsubscribe frames, heartbeat, idle timeout, frame
//!   size limit, subscription cap, optional Origin allowlist.

pub mod outbox;
pub mod ws;

pub use outbox::Outbox;
pub use ws::WsSettings;
