//! The worker's operator commands, run as an operator would run them.

use std::time::Duration;

/// How long one operator command may take in a test before it counts as hung.
pub const CLI_WITHIN: Duration = Duration::from_secs(30);

/// Runs `binary --rabbitmq-uri uri args…`: `(exit code, stdout, stderr)`, the code -1 when
/// the process was killed by a signal.
///
/// # Panics
/// When the binary cannot be started, or has not ended within [`CLI_WITHIN`] (it is killed
/// then, and the panic names the command).
pub async fn run(binary: &str, uri: &str, args: &[&str]) -> (i32, String, String) {
    let child = tokio::process::Command::new(binary)
        .arg("--rabbitmq-uri")
        .arg(uri)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the binary");
    let Ok(output) = tokio::time::timeout(CLI_WITHIN, child.wait_with_output()).await else {
        panic!("`payment-worker {}` did not end within {CLI_WITHIN:?}", args.join(" "));
    };
    let output = output.expect("the binary's output");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `command` to its end, outside a runtime, killing it when it has not ended `within`.
///
/// # Panics
/// When it cannot be started, or has not ended in time (the panic names `what`).
pub fn output_within(
    mut command: std::process::Command,
    within: Duration,
    what: &str,
) -> std::process::Output {
    use std::io::Read;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}
