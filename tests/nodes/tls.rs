//! The broker over TLS with a private CA and client certificates: one node of the test's own
//! (`verify_peer`, `fail_if_no_peer_cert`), certificates generated for the run.

use std::time::Duration;

use testkit::amqp::{Client, command};
use testkit::node::RabbitNode;
use testkit::tls::TestPki;
use testkit::{eventually, http_get};

use testkit::world::{EVENTS, World, wait_ready};

#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    let pki = TestPki::generate("tls");
    let node = tokio::task::block_in_place(|| RabbitNode::start_tls("tls", &pki));
    // Stripe's stand-in comes from a world; the broker is the TLS node.
    let world = World::new("tls").await;
    let worker_args = |extra: &[&str]| crate::args_on(&world, &node.tls_uri(), extra);
    let (ca, other_ca) = (pki.arg("ca.pem"), pki.arg("other-ca.pem"));
    let (cert, key) = (pki.arg("client.pem"), pki.arg("client-key.pem"));

    // The CA and a client certificate: payments go through amqps://.
    let worker = world
        .spawn_with(worker_args(&[
            "--rabbitmq-tls-ca-file",
            &ca,
            "--rabbitmq-tls-cert-file",
            &cert,
            "--rabbitmq-tls-key-file",
            &key,
        ]))
        .await;
    wait_ready(worker.http).await;
    let (_, body) = http_get(worker.http, "/readyz").await.unwrap();
    assert!(body.contains("on amqps://guest@localhost:"), "{body}");
    let client = Client::connect(&node.uri()).await;
    client.send_command(&command("over-tls", "u", 100.0, "USD")).await;
    assert_eq!(client.take(EVENTS, 1, Duration::from_secs(15)).await.len(), 1);
    worker.stop().await.unwrap();

    // Another CA: the broker's certificate is refused, /readyz says why, once.
    let worker = world
        .spawn_with(worker_args(&[
            "--rabbitmq-tls-ca-file",
            &other_ca,
            "--rabbitmq-tls-cert-file",
            &cert,
            "--rabbitmq-tls-key-file",
            &key,
        ]))
        .await;
    let reason = eventually(Duration::from_secs(10), || async {
        let (status, body) = http_get(worker.http, "/readyz").await?;
        (status == 503 && body.contains("certificate")).then_some(body)
    })
    .await
    .expect("not ready, saying why");
    assert_eq!(reason.matches("UnknownIssuer").count(), 1, "{reason}");
    worker.stop().await.unwrap();

    // No client certificate: the broker refuses the handshake.
    let worker = world.spawn_with(worker_args(&["--rabbitmq-tls-ca-file", &ca])).await;
    let refused = eventually(Duration::from_secs(10), || async {
        let (status, body) = http_get(worker.http, "/readyz").await?;
        (status == 503 && body.contains("connecting")).then_some(body)
    })
    .await;
    assert!(refused.is_some(), "a worker without a client certificate is not let in");
    worker.stop().await.unwrap();
}
