//! Transport for fl-server and fl-client.
//!
//! Today: the protocol messages ([`protocol`]) and their length-prefixed framing ([`framing`]),
//! both sans-IO. The QUIC endpoints (quinn + rustls, ALPN `shoal/1`, mutual TLS), certificate
//! generation and the gRPC admin service build on them.

pub mod framing;
pub mod protocol;
