//! QUIC endpoints on loopback: mutual TLS accepts a client of the run's CA and names it by its
//! certificate, refuses clients without a certificate or with one from another CA, and carries
//! framed messages and bounded payload streams.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

use shoal_core::TaskId;
use shoal_net::endpoint::{Timeouts, client_endpoint, server_endpoint};
use shoal_net::protocol::{ClientMessage, StreamHeader};
use shoal_net::stream::{MessageReader, StreamError, read_body, read_header, send_stream, write_message};
use shoal_net::tls::{ClientAuth, Leaf, PemPair, generate_ca, issue, peer_name};
use std::net::SocketAddr;

struct Pki {
    ca: PemPair,
    server: PemPair,
    client: PemPair,
}

fn pki() -> Pki {
    let ca = generate_ca("test CA").unwrap();
    let server = issue(
        &ca,
        Leaf::Server {
            name: "server",
            subject_alt_names: &["localhost".into(), "127.0.0.1".into()],
        },
    )
    .unwrap();
    let client = issue(&ca, Leaf::Client { name: "device-1" }).unwrap();
    Pki { ca, server, client }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Starts a server that accepts one connection and reports the client's certificate name, or the
/// handshake error.
async fn accept_one(
    pki: &Pki,
    auth: ClientAuth,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<Option<String>, String>>,
) {
    let server = server_endpoint(loopback(), &pki.ca.cert, &pki.server, auth, Timeouts::default()).unwrap();
    let addr = server.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let name = peer_name(&conn);
        // Keep the connection until the client is done with it.
        let _ = conn.closed().await;
        Ok(name)
    });
    (addr, handle)
}

#[tokio::test]
async fn mutual_tls_names_the_client_by_its_certificate() {
    let pki = pki();
    let (addr, server) = accept_one(&pki, ClientAuth::Required).await;
    let client = client_endpoint(&pki.ca.cert, Some(&pki.client), Timeouts::default(), addr).unwrap();
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    conn.close(0u32.into(), b"done");
    assert_eq!(server.await.unwrap().unwrap().as_deref(), Some("device-1"));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_unless_allowed() {
    let pki = pki();
    let (addr, server) = accept_one(&pki, ClientAuth::Required).await;
    let client = client_endpoint(&pki.ca.cert, None, Timeouts::default(), addr).unwrap();
    // TLS 1.3 clients finish their handshake before the server checks them: the refusal shows as
    // a connection that fails on first use.
    let refused = match client.connect(addr, "localhost").unwrap().await {
        Err(_) => true,
        Ok(conn) => conn.accept_uni().await.is_err(),
    };
    assert!(refused);
    assert!(
        server.await.unwrap().is_err(),
        "the server saw a handshake failure"
    );

    let (addr, server) = accept_one(&pki, ClientAuth::Optional).await;
    let client = client_endpoint(&pki.ca.cert, None, Timeouts::default(), addr).unwrap();
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    conn.close(0u32.into(), b"done");
    assert_eq!(server.await.unwrap().unwrap(), None, "anonymous, and allowed");
}

#[tokio::test]
async fn a_certificate_from_another_authority_is_refused() {
    let pki = pki();
    let stranger = pki_with_other_ca();
    let (addr, server) = accept_one(&pki, ClientAuth::Required).await;
    let client = client_endpoint(&pki.ca.cert, Some(&stranger), Timeouts::default(), addr).unwrap();
    let refused = match client.connect(addr, "localhost").unwrap().await {
        Err(_) => true,
        Ok(conn) => conn.accept_uni().await.is_err(),
    };
    assert!(refused);
    assert!(server.await.unwrap().is_err());
}

fn pki_with_other_ca() -> PemPair {
    let other = generate_ca("another CA").unwrap();
    issue(&other, Leaf::Client { name: "device-1" }).unwrap()
}

#[tokio::test]
async fn messages_and_bounded_payloads_cross_a_connection() {
    let pki = pki();
    let server = server_endpoint(
        loopback(),
        &pki.ca.cert,
        &pki.server,
        ClientAuth::Required,
        Timeouts::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, recv) = conn.accept_bi().await.unwrap();
        let mut reader = MessageReader::new(recv, 1024);
        let hello: ClientMessage = reader.next_message().await.unwrap().unwrap();
        let mut results = Vec::new();
        for _ in 0..3 {
            let mut uni = conn.accept_uni().await.unwrap();
            let header = read_header(&mut uni, 1024).await.unwrap();
            results.push(read_body(&mut uni, header.body_bytes(), 1 << 20).await);
        }
        (hello, results)
    });
    let client = client_endpoint(&pki.ca.cert, Some(&pki.client), Timeouts::default(), addr).unwrap();
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, &ClientMessage::Bye).await.unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let header = |n: u64| StreamHeader::Update {
        task: TaskId(1),
        part_bytes: vec![n],
    };
    // Exact, truncated (announces more than it sends), and over the limit.
    send_stream(&conn, &header(body.len() as u64), &[&body])
        .await
        .unwrap();
    send_stream(&conn, &header(body.len() as u64 + 10), &[&body])
        .await
        .unwrap();
    send_stream(&conn, &header(2 << 20), &[&body]).await.unwrap();
    let (hello, results) = receiver.await.unwrap();
    assert_eq!(hello, ClientMessage::Bye);
    assert_eq!(results[0].as_ref().unwrap(), &body);
    assert!(matches!(results[1], Err(StreamError::Truncated { .. })));
    assert!(matches!(results[2], Err(StreamError::TooLarge { .. })));
}
