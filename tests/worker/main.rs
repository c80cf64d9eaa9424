//! The worker against a real RabbitMQ (a vhost per test) and the Stripe stand-in.

mod brokers;
mod config;
mod contract;
mod flow;
mod go_peer;
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

/// The binary cargo built for these tests, started as a pod on `world` (see
/// [`testkit::world::spawn_binary`]).
async fn spawn_binary(world: &testkit::world::World, extra: &[&str]) -> testkit::pod::Pod {
    testkit::world::spawn_binary(env!("CARGO_BIN_EXE_payment-worker"), world, extra).await
}
