//! QUIC endpoints for fl-server and fl-client: quinn over the rustls configurations of
//! [`crate::tls`], with flow-control windows and UDP socket buffers sized for model-sized
//! transfers (quinn's defaults lose packets and stall under CPU load even on loopback).

use crate::tls::{self, ClientAuth, PemPair, TlsError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Per-stream receive window.
const STREAM_RECEIVE_WINDOW: u32 = 32 << 20;
/// Per-connection receive and send windows (a client's; the server receives less, see below).
const CONNECTION_WINDOW: u32 = 256 << 20;
/// What one client may have in flight to the server before the server reads it: two streams'
/// windows (an upload and a resend, or a split stream), not the client's 256 MiB — the server
/// buffers what a client sends before it reads it, so this bounds the memory one client can pin.
const SERVER_RECEIVE_WINDOW: u32 = 2 * STREAM_RECEIVE_WINDOW;
/// Streams a client may have open to the server at once: uploads go one at a time.
const SERVER_UNI_STREAMS: u32 = 4;
/// UDP socket send and receive buffers.
const SOCKET_BUFFER: usize = 4 << 20;

/// Errors setting up an endpoint.
#[derive(Debug, Error)]
pub enum EndpointError {
    /// Certificates or TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be created or bound.
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// A connection silent for this long is closed.
    pub idle: Duration,
    /// Keep-alive pings are sent this often (well under `idle`).
    pub keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

/// Which side of a connection a transport configuration is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

fn transport(timeouts: Timeouts, side: Side) -> Arc<TransportConfig> {
    let (receive_window, uni_streams) = match side {
        Side::Server => (SERVER_RECEIVE_WINDOW, SERVER_UNI_STREAMS),
        Side::Client => (CONNECTION_WINDOW, 64),
    };
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(receive_window))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_uni_streams(VarInt::from_u32(uni_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .keep_alive_interval(Some(timeouts.keep_alive))
        .max_idle_timeout(IdleTimeout::try_from(timeouts.idle).ok());
    Arc::new(t)
}

/// An endpoint configuration that survives a restart: connection ids are signed, and stateless
/// resets keyed, with secrets derived from the server's private key. A restarted server (after a
/// crash, with no memory of its connections) then recognises the old connections' packets and
/// answers them with resets their clients accept, so they reconnect at once instead of waiting
/// for an idle timeout.
fn restartable_endpoint_config(server: &PemPair) -> EndpointConfig {
    let secret = |label: &[u8]| {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(label);
        context.update(server.key.as_bytes());
        context.finish()
    };
    let reset = secret(b"shoal stateless reset v1");
    let mut config = EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    let cid = secret(b"shoal connection ids v1");
    let cid_key = cid
        .as_ref()
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_le_bytes(*b));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, EndpointError> {
    let wrap = |source| EndpointError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(wrap)?;
    // Buffers are a hint the kernel may clamp; a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(wrap)?;
    Ok(socket.into())
}

/// A server endpoint on `addr` presenting `server`'s certificate and verifying clients against
/// `ca_pem` as `auth` says. Must be called inside a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    ca_pem: &str,
    server: &PemPair,
    auth: ClientAuth,
    timeouts: Timeouts,
) -> Result<Endpoint, EndpointError> {
    let crypto = tls::server_crypto(ca_pem, server, auth)?;
    let quic = QuicServerConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(timeouts, Side::Server));
    let socket = udp_socket(addr)?;
    Endpoint::new(
        restartable_endpoint_config(server),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Socket { addr, source })
}

/// A client endpoint trusting `ca_pem` and presenting `identity` if given. Must be called inside
/// a tokio runtime.
pub fn client_endpoint(
    ca_pem: &str,
    identity: Option<&PemPair>,
    timeouts: Timeouts,
    remote: SocketAddr,
) -> Result<Endpoint, EndpointError> {
    let crypto = tls::client_crypto(ca_pem, identity)?;
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(timeouts, Side::Client));
    let local: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = udp_socket(local)?;
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Socket { addr: local, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
