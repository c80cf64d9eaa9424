//! Bad configuration stops the binary at once, naming the setting.

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payment-worker"));
    command
        .args(args)
        .env_remove("STRIPE_SECRET_KEY")
        .envs([("HTTP_ADDR", "127.0.0.1:0"), ("RECONNECT_MAX_ATTEMPTS", "1")])
        .envs(env.iter().copied());
    let what = format!("payment-worker {} with {env:?}", args.join(" "));
    let output = testkit::cli::output_within(command, testkit::cli::CLI_WITHIN, &what);
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_settings_fail_fast_and_name_the_setting() {
    for (env, name) in [
        (("PREFETCH", "0"), "PREFETCH"),
        (("STRIPE_TIMEOUT", "ten seconds"), "STRIPE_TIMEOUT"),
        (("SHUTDOWN_GRACE", "-1s"), "SHUTDOWN_GRACE"),
        (("HTTP_ADDR", "localhost"), "HTTP_ADDR"),
        (("APP_URL", "not a url"), "APP_URL"),
        (("RABBITMQ_URI", "postgres://u:secret-pw@h/db"), "RABBITMQ_URI"),
        (("PAYMENT_TOPOLOGY", "/nonexistent/profile.toml"), "/nonexistent/profile.toml"),
        (("STRIPE_SECRET_KEY", "   "), "STRIPE_SECRET_KEY"),
    ] {
        let (code, stderr) = run(&["run"], &[env]);
        assert_ne!(code, Some(0), "{env:?} accepted");
        assert!(stderr.contains(name), "{env:?}: {stderr}");
        assert!(!stderr.contains("secret-pw"), "the password leaked: {stderr}");
    }
}

#[test]
fn broker_and_secret_files_fail_fast_and_name_the_setting() {
    let dir = std::env::temp_dir().join(format!("pw-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let uri_file = dir.join("uri");
    std::fs::write(&uri_file, "amqp://u:secret-pw@127.0.0.1:1/%2f\n").unwrap();
    let missing = dir.join("missing.pem");
    let (not_pem, uri_file, missing) =
        (not_pem.to_str().unwrap(), uri_file.to_str().unwrap(), missing.to_str().unwrap());
    for (env, name) in [
        (
            &[("RABBITMQ_URI", "amqp://a/%2f"), ("RABBITMQ_URI_FILE", uri_file)][..],
            "RABBITMQ_URI_FILE",
        ),
        (&[("RABBITMQ_URI_FILE", missing)][..], "RABBITMQ_URI_FILE"),
        (
            &[("RABBITMQ_URI", "amqp://u:secret-pw@a/%2f,postgres://u:secret-pw@h/db")][..],
            "URI 2 of 2",
        ),
        (&[("RABBITMQ_TLS_CA_FILE", missing)][..], "RABBITMQ_TLS_CA_FILE"),
        (&[("RABBITMQ_TLS_CA_FILE", not_pem)][..], "RABBITMQ_TLS_CA_FILE"),
        (&[("RABBITMQ_TLS_CERT_FILE", not_pem)][..], "RABBITMQ_TLS_KEY_FILE"),
        (
            &[("RABBITMQ_TLS_CERT_FILE", not_pem), ("RABBITMQ_TLS_KEY_FILE", not_pem)][..],
            "RABBITMQ_TLS_CERT_FILE",
        ),
        (&[("RABBITMQ_CONNECT_TIMEOUT", "0s")][..], "RABBITMQ_CONNECT_TIMEOUT"),
        (&[("STRIPE_WEBHOOK_KEY_FILE", missing)][..], "STRIPE_WEBHOOK_KEY_FILE"),
    ] {
        let (code, stderr) = run(&["run"], env);
        assert_ne!(code, Some(0), "{env:?} accepted");
        assert!(stderr.contains(name), "{env:?}: {stderr}");
        assert!(!stderr.contains("secret-pw"), "the password leaked: {stderr}");
    }
    let both = ["run", "--stripe-secret-key", "sk_test_x"];
    let (code, stderr) = run(&both, &[("STRIPE_SECRET_KEY_FILE", uri_file)]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("STRIPE_SECRET_KEY_FILE"), "{stderr}");
    // The operator commands read the same settings.
    let (code, stderr) = run(&["parked", "list"], &[("RABBITMQ_URI_FILE", missing)]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("RABBITMQ_URI_FILE"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A FIFO (or anything but a regular file) in a file setting would block the start until
/// someone writes to it; it is refused at once, naming the setting, and so is a huge file.
#[test]
fn file_settings_take_only_regular_files_of_bounded_size() {
    let dir = std::env::temp_dir().join(format!("pw-config-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let huge = dir.join("huge.pem");
    std::fs::write(&huge, vec![b'a'; 2 * 1024 * 1024]).unwrap();
    let (fifo, huge, dir_path) =
        (fifo.to_str().unwrap(), huge.to_str().unwrap(), dir.to_str().unwrap());
    for setting in [
        "RABBITMQ_URI_FILE",
        "RABBITMQ_TLS_CA_FILE",
        "STRIPE_SECRET_KEY_FILE",
        "STRIPE_WEBHOOK_KEY_FILE",
        "PAYMENT_TOPOLOGY",
    ] {
        for (path, says) in [(fifo, "a FIFO"), (huge, "larger than"), (dir_path, "a directory")] {
            let (code, stderr) = run(&["run"], &[(setting, path)]);
            assert_ne!(code, Some(0), "{setting}={path} accepted");
            let named = stderr.contains(setting) || stderr.contains(path);
            assert!(named && stderr.contains(says), "{setting}={path}: {stderr}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Several nodes with the classic profile have no failover; the worker says so at start and
/// points at the quorum profile.
#[test]
fn several_nodes_with_classic_queues_warn_at_start() {
    let nodes = format!(
        "amqp://guest:guest@{}/%2f,amqp://guest:guest@{}/%2f",
        testkit::free_loopback_addr(),
        testkit::free_loopback_addr()
    );
    let (_, stderr) = run(&["run"], &[("RABBITMQ_URI", &nodes)]);
    assert!(stderr.contains("topology/quorum.toml") && stderr.contains("classic"), "{stderr}");
    let (_, stderr) = run(&["run"], &[("RABBITMQ_URI", nodes.split(',').next().unwrap())]);
    assert!(!stderr.contains("topology/quorum.toml"), "one node, no warning: {stderr}");
    let quorum = format!("{}/topology/quorum.toml", env!("CARGO_MANIFEST_DIR"));
    let (_, stderr) = run(&["run"], &[("RABBITMQ_URI", &nodes), ("PAYMENT_TOPOLOGY", &quorum)]);
    assert!(!stderr.contains("topology/quorum.toml"), "quorum, no warning: {stderr}");
}
