//! The command line: the settings every subcommand shares ([`crate::settings::broker`]), and
//! the subcommands. The run settings are in [`crate::settings`]; each operator command owns its
//! arguments in [`crate::ops`].

use clap::{Parser, Subcommand};

use crate::ops::parked::ParkedCommand;
use crate::ops::send::SendArgs;
use crate::ops::topology::TopologyCommand;
use crate::reconcile::ReconcileArgs;
use crate::settings::RunArgs;
use crate::settings::broker::GlobalArgs;

#[derive(Parser)]
#[command(
    name = "payment-worker",
    version,
    about = "Creates Stripe Checkout Sessions for trip commands from RabbitMQ, with retries that live in the broker"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the worker: consume commands, create sessions, publish events.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Show the topology, or check a live broker against it.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Inspect, replay or purge parked messages.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Publish one `payment.cmd.create_session`, as trip-service would.
    Send(SendArgs),
    /// Mark paid the trips whose webhooks failed: list Stripe's undelivered Checkout events
    /// and publish each paid one's `payment.event.success`, once.
    Reconcile(Box<ReconcileArgs>),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Each command's own arguments come first in its help, each with a description; the
    /// broker options every command shares follow under their own heading.
    #[test]
    fn a_commands_help_lists_its_own_arguments_first_each_described() {
        let mut cli = Cli::command();
        cli.build();
        for name in ["send", "reconcile", "run"] {
            let command = cli.find_subcommand_mut(name).expect(name);
            let help = command.render_long_help().to_string();
            let shared = help.find("Broker and logging (every command):").expect(&help);
            for arg in command.get_arguments().filter(|a| a.get_id() != "help") {
                let flag = format!("--{}", arg.get_long().expect("a long flag"));
                let at = [" ", "\n"]
                    .iter()
                    .find_map(|after| help.find(&format!("      {flag}{after}")))
                    .expect(&flag);
                if arg.is_global_set() {
                    assert!(at > shared, "{name}: {flag} is a shared option, listed after");
                } else {
                    assert!(at < shared, "{name}: {flag} is its own, listed first");
                    assert!(arg.get_help().is_some(), "{name}: {flag} has no description");
                }
            }
        }
    }
}
