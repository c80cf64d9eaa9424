//! The worker against a real RabbitMQ (a vhost per test) and the Stripe stand-in.

mod brokers;
mod config;
mod contract;
mod flow;
mod go_peer;
mod helpers;
mod invalid;
mod lifecycle;
mod observability;
mod ops;
mod reconcile;
mod recovery;
mod retries;
mod sickness;
mod topology;
mod traces;
mod untrusted;
mod webhook;
