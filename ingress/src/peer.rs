//! Who is on the other end of a request: the connection's peer, or, when
//! the peer is one of the deployment's own proxies, the client that proxy
//! says it forwarded for (`X-Forwarded-For`). Only configured proxies are
//! believed: anyone else can write that header.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// The connection's peer, as the listener accepted it (absent for a
/// request driven without a socket).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated addresses or CIDR networks (`10.0.0.0/8, ::1`).
    fn from_str(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (addr, bits) = item.split_once('/').unwrap_or((item, ""));
            let addr: IpAddr = addr.parse().map_err(|_| format!("{item:?} is not an address or a network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                "" => max,
                bits => bits.parse::<u8>().ok().filter(|b| *b <= max).ok_or(format!("{item:?}: bad prefix length"))?,
            };
            nets.push((addr, bits));
        }
        Ok(TrustedProxies(nets))
    }
}

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|(net, bits)| match (canonical(*net), ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix(u128::from(u32::from(net)), 32, *bits) == prefix(u128::from(u32::from(ip)), 32, *bits)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix(u128::from(net), 128, *bits) == prefix(u128::from(ip), 128, *bits)
            }
            _ => false,
        })
    }

    /// The client behind `peer`: the peer itself unless it is a trusted
    /// proxy; else the nearest address in `X-Forwarded-For` (read right to
    /// left) that is not one; an entry that does not parse stops the walk
    /// at the last trusted hop.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.contains(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.into_iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = canonical(ip);
            if !self.contains(client) {
                break;
            }
        }
        client
    }
}

/// The first `bits` of a `width`-bit address.
fn prefix(addr: u128, width: u32, bits: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        addr >> (width - u32::from(bits))
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let trusted: TrustedProxies = "10.0.0.0/8, 192.168.1.7, fd00::/8".parse().unwrap();
        assert!(trusted.contains(ip("10.200.3.4")) && trusted.contains(ip("192.168.1.7")));
        assert!(!trusted.contains(ip("192.168.1.8")) && !trusted.contains(ip("11.0.0.1")));
        assert!(trusted.contains(ip("fd12::1")) && !trusted.contains(ip("fe80::1")));
        assert!(trusted.contains(ip("::ffff:10.1.2.3")), "an IPv4-mapped address is its IPv4 address");
        assert!("0.0.0.0/0".parse::<TrustedProxies>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<TrustedProxies>().is_err(), "{bad}");
        }
        assert_eq!("".parse::<TrustedProxies>().unwrap(), TrustedProxies::default());
    }

    #[test]
    fn only_a_trusted_proxy_is_believed() {
        let trusted: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let xff = headers(&["203.0.113.9, 10.0.0.2"]);
        // Straight from a client: its header is whatever it wrote.
        assert_eq!(trusted.client(ip("198.51.100.1"), &xff), ip("198.51.100.1"));
        // Through our proxies: the first address that is not one of them.
        assert_eq!(trusted.client(ip("10.0.0.1"), &xff), ip("203.0.113.9"));
        // A client's own forged entries sit left of the real one.
        let forged = headers(&["1.2.3.4", "203.0.113.9"]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &forged), ip("203.0.113.9"));
        // No header, or garbage: the last trusted hop.
        assert_eq!(trusted.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        assert_eq!(trusted.client(ip("10.0.0.1"), &headers(&["junk, 10.0.0.3"])), ip("10.0.0.3"));
        assert_eq!(TrustedProxies::default().client(ip("10.0.0.1"), &xff), ip("10.0.0.1"));
    }
}
