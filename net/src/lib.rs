//! Transport for fl-server and fl-client (filled by the server/client issue).
//!
//! This crate will hold the QUIC endpoints (quinn + rustls, ALPN `shoal/1`, mutual TLS), certificate
//! generation, stream framing with size limits, the protocol messages, and the gRPC admin service.
