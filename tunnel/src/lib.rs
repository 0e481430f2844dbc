//! The secure tunnel every Weft component rides on.
//!
//! ```text
//!  client workload                                        server workload
//!  hbone::Pool --TCP--> TLS 1.3 (mTLS, SPIFFE) --> h2 --CONNECT ip:port--> hbone::Server
//!     keyed by (src id+addr, dst id, dst addr)          -> Handler(peer identity, target, stream)
//! ```
//!
//! - [`identity`]: SPIFFE IDs, the CA (roots, CSRs, leaves) and trust bundles.
//! - [`tls`]: rustls configs that check SPIFFE IDs, with swappable credentials.
//! - [`hbone`]: HTTP/2 CONNECT server, client pool and the stream type.
//! - [`metrics`]: counters for connections, streams and refusals.
//! - [`process`]: the standard `process_*` series (CPU, memory) every component exports.
//! - [`access_log`]: the rate-capped JSON access log node-proxy and the waypoint write.
//! - [`net`]: what every component's accept loops share.

pub mod access_log;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod process;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
