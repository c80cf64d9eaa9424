//! payment-worker: creates Stripe Checkout Sessions for the trip system's
//! `payment.cmd.create_session` commands, with retries that live in RabbitMQ.
//!
//! # Layout
//!
//! - [`cli`]: the command line: the subcommands and their arguments.
//! - [`settings`]: the worker's settings (`payment-worker run`), from flags and environment;
//!   [`settings::broker`]: those every subcommand shares (the broker, TLS, the log format).
//! - [`app`]: wiring; builds a [`consumer::Worker`] and the HTTP server from configuration.
//! - [`consumer`]: the reconnecting consumer loop, one broker session at a time, the intake
//!   that follows the Stripe circuit, and the handler of one delivery.
//! - [`delivery`]: the delivery policy, pure: the retry headers and copies
//!   ([`delivery::copies`]), what happens to a delivery ([`delivery::decision`]), where its
//!   replacement goes ([`delivery::plan`]), how it ended ([`delivery::outcome`]).
//! - [`contract`]: the Go services' envelope and payloads, read and written as Go does.
//! - [`money`]: integer amounts in minor units and currency exponents.
//! - [`stripe`]: Checkout Session creation, idempotent by trip, and failure classes; in front
//!   of it the flow control ([`stripe::flow`], [`stripe::breaker`], [`stripe::pacer`]).
//! - [`broker`]: reaching the broker ([`broker::connect`]), its declarations
//!   ([`broker::topology`]), confirmed publishing ([`broker::publish`]) and header values
//!   ([`broker::headers`]).
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

pub mod app;
pub mod broker;
pub mod cli;
pub mod consumer;
pub mod contract;
pub mod delivery;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod ops;
pub mod outbox;
pub mod reconcile;
pub mod settings;
pub mod stripe;
pub mod telemetry;
pub mod trace;
pub mod webhook;

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
