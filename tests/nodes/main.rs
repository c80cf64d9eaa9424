//! Tests that start RabbitMQ nodes of their own: a three-node cluster, a TLS node. A test
//! binary of their own, so that their nodes boot while no other test loads the machine (cargo
//! runs test binaries one after another).

mod cluster;
mod tls;

/// A worker's arguments on `world`'s Stripe stand-in, on another broker (the test's own node
/// or cluster).
fn args_on(world: &testkit::world::World, uri: &str, extra: &[&str]) -> Vec<String> {
    let mut args = world.args(extra);
    let at = args.iter().position(|a| a == "--rabbitmq-uri").expect("a broker URI") + 1;
    args[at] = uri.to_owned();
    args
}
