//! Bad configuration stops the binary at once, naming the setting.

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_payment-worker"))
        .args(args)
        .envs([("HTTP_ADDR", "127.0.0.1:0"), ("RECONNECT_MAX_ATTEMPTS", "1")])
        .envs(env.iter().copied())
        .env_remove("STRIPE_SECRET_KEY")
        .output()
        .expect("run the binary");
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
