//! Webhook targets: [`CallbackUrl`] is a URL a job's final state may be POSTed to.
//!
//! A callback URL must not turn the service into a way to reach the network it runs in, so
//! targets on loopback, private, link-local and other non-public addresses are refused unless the
//! operator allows them. Literal addresses are refused here, at submit; names are checked again
//! after DNS resolution at delivery ([`is_public`] is shared by both checks).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest callback URL accepted.
pub const MAX_CALLBACK_CHARS: usize = 2048;

/// Whether callback targets on non-public addresses are allowed (`--allow-private-webhooks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallbackPolicy {
    pub allow_private: bool,
}

/// An absolute `http`/`https` URL with a host, not pointing at a refused literal address.
#[derive(Clone, PartialEq, Eq)]
pub struct CallbackUrl(url::Url);

/// Why a callback URL was refused: a stable code and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CallbackError {
    pub code: &'static str,
    pub message: String,
}

impl CallbackUrl {
    pub fn parse(raw: &str, policy: CallbackPolicy) -> Result<Self, CallbackError> {
        let invalid = |message: String| CallbackError { code: "invalid_callback_url", message };
        if raw.chars().count() > MAX_CALLBACK_CHARS {
            return Err(invalid(format!("callback_url: longer than {MAX_CALLBACK_CHARS} characters")));
        }
        let url =
            url::Url::parse(raw.trim()).map_err(|e| invalid(format!("callback_url: not an absolute URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("callback_url: scheme `{}` is not http or https", url.scheme())));
        }
        let ip = match url.host() {
            None => return Err(invalid("callback_url: has no host".into())),
            Some(url::Host::Domain(_)) => None,
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        };
        if let Some(ip) = ip.filter(|ip| !policy.allow_private && !is_public(*ip)) {
            return Err(CallbackError {
                code: "callback_not_allowed",
                message: format!(
                    "callback_url: {ip} is a loopback, private or otherwise non-public address \
                     (the operator can allow these with --allow-private-webhooks)"
                ),
            });
        }
        Ok(CallbackUrl(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or_default()
    }
}

/// Shows scheme, host and path only: a URL may carry credentials or tokens in its query.
impl fmt::Debug for CallbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.0.scheme(), self.host(), self.0.path())
    }
}

impl fmt::Display for CallbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Whether `ip` is a globally routable unicast address: not loopback, private, shared (CGNAT),
/// link-local, unspecified, multicast, broadcast, documentation, benchmarking or reserved.
/// IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64) are judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let refused = ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (RFC 6598)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking (RFC 2544)
        || a >= 240; // reserved
    !refused
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // IPv4-translated (::ffff:0:a.b.c.d, RFC 2765) and 6to4 (2002:aabb:ccdd::/48, RFC 3056) carry
    // an IPv4 address too, judged as such.
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    // Local-use NAT64 (64:ff9b:1::/48, RFC 8215) is never globally routable.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return false;
    }
    // NAT64 (64:ff9b::/96) and the deprecated IPv4-compatible form (::a.b.c.d) carry an IPv4 address.
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || s[..6] == [0; 6] {
        let [.., hi, lo] = s;
        let v4 = Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
        if !ip.is_loopback() && !ip.is_unspecified() {
            return is_public_v4(v4);
        }
    }
    let refused = ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0; 3]); // discard-only
    !refused
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: CallbackPolicy = CallbackPolicy { allow_private: false };
    const OPEN: CallbackPolicy = CallbackPolicy { allow_private: true };

    #[test]
    fn public_and_non_public_addresses() {
        let public =
            ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
        let refused = [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ];
        for ip in refused {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is not public");
        }
    }

    #[test]
    fn callback_urls_that_parse() {
        for raw in ["https://hooks.example.com/offload?token=x", "http://example.com:8080/a/b", "http://8.8.8.8/"] {
            let url = CallbackUrl::parse(raw, STRICT).unwrap_or_else(|e| panic!("{raw}: {e:?}"));
            assert!(!format!("{url:?}").contains("token"), "Debug hides the query");
        }
        // Names pass at submit; they are checked after resolution, at delivery.
        assert!(CallbackUrl::parse("http://localhost:9000/", STRICT).is_ok());
        assert!(CallbackUrl::parse("http://127.0.0.1:9000/", OPEN).is_ok());
    }

    #[test]
    fn callback_urls_that_are_refused() {
        let long = format!("https://example.com/{}", "a".repeat(MAX_CALLBACK_CHARS));
        let cases: &[(&str, &str)] = &[
            ("", "invalid_callback_url"),
            ("example.com/hook", "invalid_callback_url"),
            ("/relative", "invalid_callback_url"),
            ("ftp://example.com/", "invalid_callback_url"),
            ("file:///etc/passwd", "invalid_callback_url"),
            ("javascript:alert(1)", "invalid_callback_url"),
            ("http://", "invalid_callback_url"),
            (&long, "invalid_callback_url"),
            ("http://127.0.0.1:9000/", "callback_not_allowed"),
            ("http://[::1]/", "callback_not_allowed"),
            ("http://10.1.2.3/", "callback_not_allowed"),
            ("http://169.254.169.254/latest/meta-data", "callback_not_allowed"),
            ("http://0x7f000001/", "callback_not_allowed"),
            ("http://2130706433/", "callback_not_allowed"),
            ("http://[::ffff:192.168.0.1]/", "callback_not_allowed"),
            ("http://[::ffff:0:7f00:1]/", "callback_not_allowed"),
            ("http://[64:ff9b:1::7f00:1]/", "callback_not_allowed"),
            ("http://[2002:7f00:1::1]/", "callback_not_allowed"),
            ("http://[2002:a00:1::1]/", "callback_not_allowed"),
        ];
        for (raw, code) in cases {
            let err = CallbackUrl::parse(raw, STRICT).expect_err(raw);
            assert_eq!(err.code, *code, "{raw}: {}", err.message);
            assert!(err.message.starts_with("callback_url"), "{raw}: {}", err.message);
        }
    }
}
