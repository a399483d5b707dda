//! The outgoing HTTP client of the async I/O arbiter (awc), and the resolver that keeps webhook
//! deliveries off loopback, private and link-local addresses.
//!
//! The check sits in the connector's DNS step, so the address that was checked is the address
//! connected to (no window for a name to re-resolve elsewhere). Literal addresses skip DNS; they
//! were refused at submit ([`crate::domain::callback`]). Redirects are never followed.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use actix_tls::connect::{Connector as TcpConnector, Resolve, Resolver};
use futures::future::LocalBoxFuture;

use crate::domain::callback::is_public;

/// A name that resolved to an address webhooks may not reach.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {ip}, a loopback, private or otherwise non-public address")]
pub struct NotPublic {
    pub host: String,
    pub ip: IpAddr,
}

/// Resolves with the system resolver; with `public_only`, refuses the name if any address is not
/// public.
struct CheckedResolver {
    public_only: bool,
}

impl Resolve for CheckedResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> LocalBoxFuture<'a, Result<Vec<SocketAddr>, Box<dyn StdError>>> {
        Box::pin(async move {
            // A literal address (an IPv6 one comes bracketed, as in the URL) is not a name.
            let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let addrs: Vec<SocketAddr> = match literal.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
            };
            if let Some(bad) = addrs.iter().find(|a| self.public_only && !is_public(a.ip())) {
                return Err(Box::new(NotPublic { host: host.to_string(), ip: bad.ip() }) as Box<dyn StdError>);
            }
            Ok(addrs)
        })
    }
}

/// A client whose every request must finish (answer head included) within `timeout`.
/// `public_only`: refuse names that resolve to non-public addresses. Must be called on the thread
/// that uses the client (awc clients are not `Send`).
pub fn http_client(timeout: Duration, public_only: bool) -> awc::Client {
    let resolver = Resolver::custom(CheckedResolver { public_only });
    let connector = awc::Connector::new()
        .timeout(timeout.min(Duration::from_secs(5)))
        .connector(TcpConnector::new(resolver).service());
    awc::Client::builder()
        .connector(connector)
        .timeout(timeout)
        .disable_redirects()
        .add_default_header(("user-agent", concat!("offload/", env!("CARGO_PKG_VERSION"))))
        .finish()
}

/// Whether a failed request was refused by the resolver's address check.
pub fn refused_target(err: &awc::error::SendRequestError) -> Option<&NotPublic> {
    match err {
        awc::error::SendRequestError::Connect(awc::error::ConnectError::Resolver(e)) => e.downcast_ref::<NotPublic>(),
        _ => None,
    }
}
