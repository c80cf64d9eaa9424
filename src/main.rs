//! The binary: parses the command line and hands over to the worker or an operator command.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use payment_worker::app::App;
use payment_worker::cli::{Cli, Command, GlobalArgs, LogFormat};
use payment_worker::config::RunArgs;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode, Box<dyn Error>> = match cli.command {
        Command::Run(args) => {
            init_tracing(cli.global.log_format);
            run(&cli.global, &args).await
        }
        Command::Topology(command) => command.exec(&cli.global).await.map_err(Into::into),
        Command::Parked(command) => command.exec(&cli.global).await.map_err(Into::into),
        Command::Send(args) => args.exec(&cli.global).await.map_err(Into::into),
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

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
        LogFormat::Text => builder.init(),
    }
}
