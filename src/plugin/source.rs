//! `--source auto`: the address a machine sees this host's connections come from, like the
//! portal's "My IP". The kernel picks it: a UDP socket "connected" to the machine's address
//! gets the source address of the route there, and no packet is sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use ipnet::IpNet;

/// The local address the kernel would use to reach `destination`, as a host prefix
/// (`/32` or `/128`).
pub fn auto(destination: IpAddr) -> std::io::Result<IpNet> {
    let any: IpAddr = match destination {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    // Any port: nothing is sent, the kernel only chooses the route and its source.
    socket.connect(SocketAddr::new(destination, 9))?;
    Ok(IpNet::from(socket.local_addr()?.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_reached_from_loopback() {
        let source = auto("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(source, "127.0.0.1/32".parse::<IpNet>().unwrap());
    }
}
