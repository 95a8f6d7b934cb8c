//! Types and contracts shared by every kvtier part. No I/O lives here.
//!
//! - [`prefix`]: how the router hashes a request's text into chained chunk hashes, so that
//!   every router replica (and, later, residency events) agree on what a prefix is.
//! - [`session`]: which request headers carry an agent session id.

pub mod prefix;
pub mod session;
