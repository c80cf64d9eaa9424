//! The broker: reaching it, declaring what the worker relies on, and publishing so that the
//! broker's word comes back.
//!
//! - [`connect`]: one node or a cluster's several, TLS, the connection pool, the node probe.
//! - [`topology`]: profiles (`topology/*.toml`) and the declarations they make.
//! - [`publish`]: confirmed, mandatory publishing, and consumers on channels of their own.
//! - [`headers`]: AMQP header values, whatever type a peer sent them as.

pub mod connect;
pub mod headers;
pub mod publish;
pub mod topology;
