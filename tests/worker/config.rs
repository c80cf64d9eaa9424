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
        (("STRIPE_WAIT_BUDGET", "13h"), "STRIPE_WAIT_BUDGET"),
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
    let quorum = testkit::world::repo_path("topology/quorum.toml").display().to_string();
    let (_, stderr) = run(&["run"], &[("RABBITMQ_URI", &nodes), ("PAYMENT_TOPOLOGY", &quorum)]);
    assert!(!stderr.contains("topology/quorum.toml"), "quorum, no warning: {stderr}");
}

/// A client certificate issued as many tutorials do (`openssl x509 -req` without
/// extensions) is X.509 v1, which TLS refuses; the start fails naming the setting and how to
/// re-issue it, instead of failing every handshake as if the broker's certificate were wrong.
#[test]
fn a_v1_client_certificate_is_refused_at_start_saying_how_to_reissue_it() {
    let dir = std::env::temp_dir().join(format!("pw-config-v1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let mut command = Command::new("openssl");
        command.args(args).current_dir(&dir);
        let output = testkit::cli::output_within(command, testkit::cli::CLI_WITHIN, "openssl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "openssl {args:?}: {stderr}");
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=test-ca"];
    ca.extend(key);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca);
    let mut csr = vec!["req", "-subj", "/CN=client"];
    csr.extend(key);
    csr.extend(["-keyout", "client.key", "-out", "client.csr"]);
    openssl(&csr);
    std::fs::write(dir.join("ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (out, extensions) in [("v1.pem", None), ("v3.pem", Some("ext"))] {
        let mut args = vec!["x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey"];
        args.extend(["ca.key", "-CAcreateserial", "-days", "1", "-out", out]);
        if let Some(ext) = extensions {
            args.extend(["-extfile", ext]);
        }
        openssl(&args);
    }
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let run_with = |cert: &str| {
        let uri = format!("amqps://guest:guest@{}/%2f", testkit::free_loopback_addr());
        let settings = [
            ("RABBITMQ_URI", uri.as_str()),
            ("RABBITMQ_TLS_CERT_FILE", cert),
            ("RABBITMQ_TLS_KEY_FILE", &path("client.key")),
        ];
        run(&["run"], &settings)
    };
    let (code, stderr) = run_with(&path("v1.pem"));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("RABBITMQ_TLS_CERT_FILE")
            && stderr.contains("v1")
            && stderr.contains("-extfile"),
        "{stderr}"
    );
    let (_, stderr) = run_with(&path("v3.pem"));
    assert!(!stderr.contains("RABBITMQ_TLS_CERT_FILE"), "a v3 certificate is taken: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
