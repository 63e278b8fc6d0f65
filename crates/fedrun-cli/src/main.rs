//! The `fedrun` command: parses the command line and hands over to the library
//! ([`fedrun_cli::simulate()`]); everything else lives in the library so tests run the same code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedrun_cli::output::{format_table, RoundRecord};
use fedrun_cli::{simulate, RunObserver, SimulateOptions};
use indicatif::{ProgressBar, ProgressStyle};

/// fedrun: NVIDIA FLARE's client job engine in Rust.
#[derive(Debug, Parser)]
#[command(name = "fedrun", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole federation in this process: one server job (ScatterAndGather with FedAvg)
    /// and N client jobs on an in-process network.
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Number of client sites (site-1 .. site-N); also the workflow's min_clients.
    #[arg(short = 'n', long, default_value_t = 4)]
    clients: usize,
    /// Number of rounds [default: 5, or the job's num_rounds with --job].
    #[arg(short = 'r', long)]
    rounds: Option<u64>,
    /// Workspace directory for the results [default: ./fedrun-workspace/JOB-ID, or the
    /// system temp dir when that cannot be created].
    #[arg(short = 'w', long)]
    workspace: Option<PathBuf>,
    /// A job directory in NVFlare's layout (meta.json, app/config/config_fed_*.json)
    /// [default: the built-in logistic-regression job, examples/logreg].
    #[arg(short = 'j', long)]
    job: Option<PathBuf>,
    /// Seed of the synthetic data (sets the `seed` argument of the job's executors).
    #[arg(short = 's', long)]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet by default so the progress bar stays clean; RUST_LOG=info shows the engines' logs.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match cli.command {
        Command::Simulate(args) => run_simulate(args),
    }
}

/// Draws one progress-bar tick per round (on stderr, indicatif's default target).
struct ProgressObserver {
    bar: ProgressBar,
}

impl RunObserver for ProgressObserver {
    fn run_started(&mut self, job_id: &str, rounds: u64) {
        self.bar.set_length(rounds);
        self.bar
            .set_message(format!("job {job_id}: round 1/{rounds} running"));
    }

    fn round_completed(&mut self, r: &RoundRecord) {
        self.bar.inc(1);
        let total = self.bar.length().unwrap_or(0);
        let metric = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        self.bar.set_message(format!(
            "round {}/{total} loss {} accuracy {}",
            u64::from(r.round) + 1,
            metric(r.loss),
            metric(r.accuracy)
        ));
    }
}

fn run_simulate(args: SimulateArgs) -> ExitCode {
    let options = SimulateOptions {
        clients: args.clients,
        rounds: args.rounds,
        workspace: args.workspace,
        job: args.job,
        seed: args.seed,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut observer = ProgressObserver { bar: bar.clone() };
    let result = actix::System::new().block_on(simulate(options, &mut observer));
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            println!(
                "job {} ({}), {} clients, {} round(s) in {:.2} s: {}",
                report.job_name,
                report.job_id,
                report.sites.len(),
                report.round_metrics.len(),
                report.elapsed.as_secs_f64(),
                report.status
            );
            print!("{}", format_table(&report.rounds()));
            println!("workspace: {}", report.workspace.display());
            for file in &report.files {
                println!("  {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The message already names its cause (CliError's messages embed their sources).
            eprintln!("fedrun simulate: error: {e}");
            ExitCode::FAILURE
        }
    }
}
