//! payment-worker: creates Stripe Checkout Sessions for the trip system's
//! `payment.cmd.create_session` commands, with retries that live in RabbitMQ.
//!
//! # Layout
//!
//! - [`cli`]: the command line and the settings every subcommand shares.
//! - [`config`]: the worker's settings (`payment-worker run`), from flags and environment.
//! - [`app`]: wiring; builds a [`worker::Worker`] and the HTTP server from configuration.
//! - [`worker`]: the consumer loop and what happens to each delivery.
//! - [`contract`]: the Go services' envelope and payloads, read and written as Go does.
//! - [`money`]: integer amounts in minor units and currency exponents.
//! - [`decision`]: what happens to a delivery, as one pure function of what went wrong.
//! - [`stripe`]: Checkout Session creation, idempotent by trip, and failure classes.
//! - [`flow`]: flow control in front of Stripe: [`breaker`] (the circuit breaker over
//!   Stripe-wide failures) and [`pacer`] (the adaptive request rate).
//! - [`retry`]: the headers a message carries between attempts; retry and parked copies.
//! - [`topology`]: profiles (`topology/*.toml`) and the declarations they make.
//! - [`access`]: reaching the broker: one node or a cluster's several, TLS, the pool.
//! - [`broker`]: confirmed, mandatory publishing.
//! - [`headers`]: AMQP header values, whatever type a peer sent them as.
//! - [`trace`]: W3C trace context carried from a command to the events it causes, and
//!   the spans' helpers.
//! - [`telemetry`]: logs, and OpenTelemetry spans exported with OTLP when asked for.
//! - [`ops`]: the operator subcommands (`topology`, `parked`, `send`), a file each.
//! - [`webhook`]: Stripe's `checkout.session.completed` into `payment.event.success`.
//! - [`reconcile`]: `payment-worker reconcile`, the events whose webhooks failed, from
//!   Stripe's Events API.
//! - [`outbox`] and [`ledger`]: `payment.event.success` once per Stripe event id, whoever
//!   received it, with the published ids kept in a stream.
//! - [`metrics`], [`health`], [`http`]: what operators see.

pub mod access;
pub mod app;
pub mod breaker;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contract;
pub mod decision;
pub mod flow;
#[cfg(test)]
mod fuzz;
pub mod headers;
pub mod health;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod ops;
pub mod outbox;
pub mod pacer;
pub mod reconcile;
pub mod retry;
pub mod stripe;
pub mod telemetry;
pub mod topology;
pub mod trace;
pub mod webhook;
pub mod worker;

/// An error and its sources, joined with `: `; a source whose text its error already
/// includes is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The most a file named by a setting may hold (a secret, a PEM bundle, a topology profile).
pub const MAX_SETTING_FILE: u64 = 1024 * 1024;

/// Reads a file a setting names, if it is a regular file of at most [`MAX_SETTING_FILE`]
/// bytes. Anything else (a FIFO, which would block the start until someone writes to it; a
/// device; a directory) is refused before it is opened.
///
/// # Errors
/// The file is missing, unreadable, not a regular file, or too large.
pub fn read_setting_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::unix::fs::FileTypeExt as _;
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(Error::new(ErrorKind::InvalidInput, format!("{what}, not a regular file")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_SETTING_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SETTING_FILE {
        let limit = MAX_SETTING_FILE / 1024;
        return Err(Error::new(ErrorKind::InvalidData, format!("larger than {limit} KiB")));
    }
    Ok(bytes)
}
