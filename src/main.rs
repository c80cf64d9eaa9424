//! The binary: parses the command line and hands over to the worker or an operator command.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use payment_worker::app::App;
use payment_worker::cli::{Cli, Command};
use payment_worker::settings::RunArgs;
use payment_worker::settings::broker::GlobalArgs;
use payment_worker::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode, Box<dyn Error>> = match cli.command {
        Command::Run(args) => match Telemetry::init(cli.global.log_format) {
            Ok(telemetry) => {
                let result = run(&cli.global, &args).await;
                if !telemetry.shutdown().await {
                    // The flush is stuck on a collector that does not answer, on a thread
                    // the runtime would wait for: exit without it.
                    if let Err(message) = &result {
                        eprintln!("payment-worker: {message}");
                    }
                    std::process::exit(i32::from(result.is_err()));
                }
                result
            }
            Err(e) => Err(e.into()),
        },
        Command::Topology(command) => command.exec(&cli.global).await.map_err(Into::into),
        Command::Parked(command) => command.exec(&cli.global).await.map_err(Into::into),
        Command::Send(args) => args.exec(&cli.global).await.map_err(Into::into),
        Command::Reconcile(args) => args.exec(&cli.global).await.map_err(Into::into),
    };
    result.unwrap_or_else(|message| {
        error!(error = %message, "payment-worker stopped");
        eprintln!("payment-worker: {message}");
        ExitCode::FAILURE
    })
}

async fn run(global: &GlobalArgs, args: &RunArgs) -> Result<ExitCode, Box<dyn Error>> {
    let app = App::build(global, args).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    app.run(shutdown).await?;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "stopping");
    shutdown.cancel();
}
