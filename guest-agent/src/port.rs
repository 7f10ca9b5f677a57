//! [`StreamTarget::Port`](hearth_protocol::StreamTarget::Port): a stream relayed to and
//! from a TCP connection to one of the guest's own apps.

use hearth_protocol::{Conn, Error};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A loopback connect either succeeds or is refused at once; only an app whose accept
/// backlog is full leaves the SYN unanswered, and the host's request should not hang on
/// it for the kernel's two minutes of retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `port` on the guest's loopback. IPv4 first, since that is where most
/// apps listen (and `0.0.0.0` covers it); then `::1` for apps bound to IPv6 only.
pub async fn connect(port: u16) -> Result<TcpStream, Error> {
    if port == 0 {
        return Err(Error::invalid("port 0 is not a port one can connect to"));
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let stream = match connect_one(v4).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match connect_one(v6).await {
            // No IPv6 loopback in this guest counts as nobody listening there.
            Err(e) if refused_or_no_v6(&e) => return Err(nothing_listens(port)),
            other => other,
        },
        other => other,
    }
    .map_err(|e| Error::from_io(&e, format_args!("connect to port {port} in the guest")))?;
    // Proxied traffic is often small interactive writes (WebSocket frames, SSE events):
    // Nagle would hold each one back for an ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("port {port}: TCP_NODELAY: {e}");
    }
    Ok(stream)
}

async fn connect_one(addr: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn refused_or_no_v6(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
        || matches!(
            e.raw_os_error(),
            Some(libc::EADDRNOTAVAIL | libc::ENETUNREACH | libc::EAFNOSUPPORT)
        )
}

fn nothing_listens(port: u16) -> Error {
    Error::not_found(format!("nothing listens on port {port} in the guest"))
}

/// Copies both ways until both directions are done. Each side's EOF becomes a
/// half-close of the other, so a client that shuts down its write side still gets the
/// rest of the answer. `leftover` is what the client sent right behind its `Open`.
pub async fn relay(mut conn: Conn, leftover: Vec<u8>, mut tcp: TcpStream) -> io::Result<()> {
    if !leftover.is_empty() {
        tcp.write_all(&leftover).await?;
    }
    tokio::io::copy_bidirectional(&mut conn, &mut tcp).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_protocol::ErrorKind;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn falls_back_to_ipv6_loopback_and_names_a_closed_port() {
        assert_eq!(
            connect(0).await.err().unwrap().kind,
            ErrorKind::InvalidArgument
        );

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = connect(port).await.err().unwrap();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(
            err.message,
            format!("nothing listens on port {port} in the guest")
        );

        // An app bound to ::1 only; some build machines have no IPv6 at all.
        let Ok(v6) = TcpListener::bind("[::1]:0").await else {
            eprintln!("skipped the IPv6 half: no ::1 here");
            return;
        };
        let port = v6.local_addr().unwrap().port();
        let (client, accepted) = tokio::join!(connect(port), v6.accept());
        let client = client.unwrap();
        assert!(client.peer_addr().unwrap().is_ipv6());
        assert!(accepted.is_ok());
    }
}
