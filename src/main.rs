use std::process::ExitCode;

use clap::Parser;
use payment_worker::app::App;
use payment_worker::config::{
    Cli, Command, GlobalArgs, LogFormat, ParkedCommand, ParkedFilter, RunArgs, SendArgs,
    ShowFormat, TopologyCommand,
};
use payment_worker::ops::{self, Action, Filter, OpsError, SendCommand};
use payment_worker::topology::Topology;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_tracing(cli.global.log_format);
            run(&cli.global, &args).await
        }
        Command::Topology(command) => topology(&cli.global, command).await,
        Command::Parked(command) => parked(&cli.global, command).await,
        Command::Send(args) => send(&cli.global, &args).await,
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            error!(error = %message, "payment-worker stopped");
            eprintln!("payment-worker: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(global: &GlobalArgs, args: &RunArgs) -> Result<ExitCode, String> {
    let app = App::build(global, args).await.map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    app.run(shutdown).await.map_err(|e| e.to_string())?;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn load_topology(global: &GlobalArgs) -> Result<Topology, String> {
    Topology::load(global.topology.as_deref()).map_err(|e| e.to_string())
}

async fn connect(global: &GlobalArgs) -> Result<lapin::Connection, String> {
    let uri = global.broker_uri()?;
    ops::connect(&uri).await.map_err(|e| e.to_string())
}

async fn topology(global: &GlobalArgs, command: TopologyCommand) -> Result<ExitCode, String> {
    let topology = load_topology(global)?;
    match command {
        TopologyCommand::Show { format: ShowFormat::Text, .. } => {
            print!("{}", ops::show_text(&topology))
        }
        TopologyCommand::Show { format: ShowFormat::Definitions, vhost } => {
            let definitions = ops::show_definitions(&topology, &vhost);
            println!("{}", serde_json::to_string_pretty(&definitions).map_err(|e| e.to_string())?);
        }
        TopologyCommand::Check { json } => {
            let connection = connect(global).await?;
            let lines = ops::check(&connection, &topology).await.map_err(|e| e.to_string())?;
            let mut ok = true;
            for line in &lines {
                ok &= matches!(line.status, "present" | "unchecked");
                if json {
                    ops::print_json(line);
                } else {
                    println!("{:<10} {:<60} {}", line.status, line.object, line.detail);
                }
            }
            let _ = connection.close(200, "done".into()).await;
            if !ok {
                eprintln!("payment-worker: the broker differs from profile {:?}", topology.profile);
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn filter(from: ParkedFilter) -> Filter {
    Filter { trip_ids: from.trips, reason: from.reason, all: from.all, limit: from.limit }
}

async fn parked(global: &GlobalArgs, command: ParkedCommand) -> Result<ExitCode, String> {
    let topology = load_topology(global)?;
    let (action, filter, dry_run, json) = match command {
        ParkedCommand::List { limit, json } => (
            Action::List,
            Filter { all: true, limit: Some(limit), ..Filter::default() },
            true,
            json,
        ),
        ParkedCommand::Replay { filter: f, dry_run, json } => {
            (Action::Replay, filter(f), dry_run, json)
        }
        ParkedCommand::Purge { filter: f, yes, json } => (Action::Purge, filter(f), !yes, json),
    };
    filter.validate().map_err(|e| e.to_string())?;
    let connection = connect(global).await?;
    let verb = match (action, dry_run) {
        (Action::List, _) => "parked",
        (Action::Replay, true) => "would replay",
        (Action::Replay, false) => "replayed",
        (Action::Purge, true) => "would purge",
        (Action::Purge, false) => "purged",
    };
    let count = ops::walk_parked(&connection, &topology, action, &filter, dry_run, |entry| {
        if json {
            ops::print_json(entry);
        } else if action == Action::List {
            println!("{}", entry.line());
        } else {
            println!("{verb} {}", entry.line());
        }
    })
    .await
    .map_err(|e: OpsError| e.to_string())?;
    let _ = connection.close(200, "done".into()).await;
    if !json {
        eprintln!("{count} message(s) {verb}");
        if action == Action::Purge && dry_run && count > 0 {
            eprintln!("nothing removed: add --yes to purge them");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn send(global: &GlobalArgs, args: &SendArgs) -> Result<ExitCode, String> {
    let topology = load_topology(global)?;
    let connection = connect(global).await?;
    let command = SendCommand {
        trip_id: args.trip_id.clone(),
        user_id: args.user_id.clone(),
        driver_id: args.driver_id.clone(),
        amount_cents: args.amount_cents,
        currency: args.currency.clone(),
        package_slug: args.package_slug.clone(),
    };
    ops::send(&connection, &topology, &command, args.traceparent.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let _ = connection.close(200, "done".into()).await;
    if args.json {
        ops::print_json(&serde_json::json!({"sent": true, "trip_id": args.trip_id}));
    } else {
        println!("sent payment.cmd.create_session for trip {}", args.trip_id);
    }
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
