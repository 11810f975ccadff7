//! Transport for fl-server and fl-client.
//!
//! - [`protocol`]: the messages both sides exchange and the stream headers (sans-IO).
//! - [`framing`]: length-prefixed postcard frames with a size limit (sans-IO).
//! - [`tls`]: the run's certificate authority, server and client certificates, and the rustls
//!   configurations (TLS 1.3, ALPN `shoal/1`, ring, mutual TLS by default).
//! - [`endpoint`]: tuned quinn endpoints over those configurations.
//! - [`stream`]: framed messages and bounded payload transfers over quinn streams.

pub mod endpoint;
pub mod framing;
pub mod protocol;
pub mod stream;
pub mod tls;

pub use quinn;
