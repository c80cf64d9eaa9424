//! The worker's operator commands, run as an operator would run them.

/// Runs `binary --rabbitmq-uri uri args…`: `(exit code, stdout, stderr)`, the code -1 when
/// the process was killed by a signal.
///
/// # Panics
/// When the binary cannot be started.
pub async fn run(binary: &str, uri: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(binary)
        .arg("--rabbitmq-uri")
        .arg(uri)
        .args(args)
        .output()
        .await
        .expect("run the binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
