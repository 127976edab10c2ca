//! The machine's own addresses, as the kernel lists them (`ip -j address show`): what the
//! agent protects when no `--address` is given.
//!
//! Every address counts, IPv4 and IPv6, link-local included (a neighbour on the link can
//! reach a port through it); only host-scoped ones (loopback) are left out, since loopback
//! traffic never crosses an NSG. The agent reads them again every few seconds, so an address
//! added later (DHCP, a second interface) is protected soon after it appears.

use std::net::IpAddr;

use serde::Deserialize;

use super::Error;
use super::apply::Nft;

#[derive(Deserialize)]
struct Interface {
    #[serde(default)]
    addr_info: Vec<Address>,
}

#[derive(Deserialize)]
struct Address {
    local: Option<IpAddr>,
    #[serde(default)]
    scope: String,
}

/// The addresses in `ip -j address show` output, sorted, without duplicates.
pub fn parse(json: &[u8]) -> Result<Vec<IpAddr>, Error> {
    let interfaces: Vec<Interface> = serde_json::from_slice(json)
        .map_err(|e| Error::Addresses(format!("unreadable `ip -j address` output: {e}")))?;
    let mut addresses: Vec<IpAddr> = interfaces
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter(|a| a.scope != "host")
        .filter_map(|a| a.local)
        .filter(|a| !a.is_loopback())
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// The machine's addresses: of the network namespace `nft` runs in.
pub async fn local(nft: &Nft) -> Result<Vec<IpAddr>, Error> {
    let output = nft
        .output("ip", &["-j", "address", "show"])
        .await
        .map_err(Error::Addresses)?;
    parse(output.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_but_loopback() {
        let json = br#"[
          {"ifname":"lo","addr_info":[
            {"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"},
            {"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
          {"ifname":"eth0","addr_info":[
            {"family":"inet","local":"198.18.0.10","prefixlen":24,"scope":"global"},
            {"family":"inet","local":"198.18.0.20","prefixlen":24,"scope":"global"},
            {"family":"inet6","local":"2001:2::10","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
          {"ifname":"dummy0"}
        ]"#;
        let found: Vec<String> = parse(json)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            ["198.18.0.10", "198.18.0.20", "2001:2::10", "fe80::1"]
        );
    }

    #[test]
    fn unreadable_output_is_an_error_not_an_empty_machine() {
        assert!(parse(b"not json").is_err());
    }
}
