//! The `fedrun` command: parses the command line and hands over to the library
//! ([`fedrun_cli::simulate_setup()`], [`fedrun_cli::server_cmd::serve`],
//! [`fedrun_cli::client_cmd::run_client`]); everything else lives in the library so tests run
//! the same code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fedrun_cli::cj::args::{take_credentials, Credentials, WorkerArgs};
use fedrun_cli::cj::{run_job, JobOptions};
use fedrun_cli::client_cmd::{run_client, ClientOptions};
use fedrun_cli::output::{format_table, RoundRecord};
use fedrun_cli::server_cmd::{serve, ServerOptions, DEFAULT_END_OF_RUN_DEADLINE};
use fedrun_cli::transport::TransportKind;
use fedrun_cli::{simulate_setup, RunObserver, SimulateOptions, SimulationReport, SimulationSetup};
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
    /// and N client jobs on an in-process network (or loopback TCP with --transport tcp).
    Simulate(SimulateArgs),
    /// Run the server job of one run alone, for `fedrun client` processes that connect over
    /// TCP. Prints `listening tcp://HOST:PORT job ID` on its first stdout line.
    Server(ServerArgs),
    /// Run one client job, connected to a `fedrun server` over TCP, until the server ends the
    /// run.
    Client(ClientArgs),
    /// Run one client job of a real NVFlare deployment, launched by NVFlare's client parent
    /// with its worker's options (-m WS -w STARTUP -n JOB -c CLIENT -p PARENT_URL -g TARGET
    /// -scheme SCHEME -s fed_client.json --set k=v ...; credentials in NVFLARE_JOB_AUTH_TOKEN,
    /// NVFLARE_JOB_TOKEN_SIGNATURE, NVFLARE_JOB_SSID).
    Job(JobArgs),
}

#[derive(Debug, clap::Args)]
struct JobArgs {
    /// The options NVFlare's client parent passes its job process, unchanged.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    options: Vec<String>,
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
    /// What carries the messages: one in-process network, or one NVFlare endpoint per job on
    /// loopback TCP.
    #[arg(short = 't', long, value_enum, default_value_t = TransportKind::InProc)]
    transport: TransportKind,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Address to listen on, HOST:PORT or stcp://HOST:PORT (TLS) (port 0: any free port; the
    /// first stdout line says which).
    #[arg(short = 'l', long)]
    listen: String,
    /// The client sites, comma-separated (e.g. site-1,site-2); also the workflow's
    /// min_clients.
    #[arg(short = 'c', long, value_delimiter = ',', required = true)]
    clients: Vec<String>,
    /// Number of rounds [default: 5, or the job's num_rounds with --job].
    #[arg(short = 'r', long)]
    rounds: Option<u64>,
    /// A job directory in NVFlare's layout [default: the built-in logistic-regression job].
    #[arg(short = 'j', long)]
    job: Option<PathBuf>,
    /// Workspace directory for the results [default: ./fedrun-workspace/JOB-ID].
    #[arg(short = 'w', long)]
    workspace: Option<PathBuf>,
    /// The job id (clients need the same) [default: a fresh UUID].
    #[arg(long)]
    job_id: Option<String>,
    /// Give up (abort the run, exit non-zero) after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// How long clients wait before asking for a task again, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_interval_ms: u64,
    /// A client whose connection closed and is not back after this many seconds is counted
    /// out of the round (the run fails then if too few clients are left).
    #[arg(long, default_value_t = 30)]
    client_grace: u64,
    #[command(flatten)]
    tls: fedrun_cli::tls_opts::TlsOptions,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The server, tcp://HOST:PORT (stcp://HOST:PORT: TLS).
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: fedrun_cli::tls_opts::TlsOptions,
    /// This client's site name (one of the server's --clients).
    #[arg(short = 'n', long)]
    name: String,
    /// The job id the server prints.
    #[arg(long)]
    job_id: String,
    /// A job directory in NVFlare's layout [default: the built-in logistic-regression job].
    #[arg(short = 'j', long)]
    job: Option<PathBuf>,
    /// Seed of the synthetic data (sets the `seed` argument of the job's executors).
    #[arg(short = 's', long)]
    seed: Option<u64>,
    /// Give up (end the run, exit non-zero) after this many seconds, connecting included.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn main() -> ExitCode {
    // A job process takes its credentials out of the environment before anything else runs
    // (no thread exists yet), so that nothing it starts inherits them.
    let is_job = std::env::args().nth(1).as_deref() == Some("job");
    let credentials = if is_job {
        take_credentials()
    } else {
        Credentials::default()
    };
    let cli = Cli::parse();
    if !is_job {
        // Quiet by default so the progress bar stays clean; RUST_LOG=info shows the engines'
        // logs. A job process sets up its own log once it knows its job directory.
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    }
    match cli.command {
        Command::Simulate(args) => run_simulate(args),
        Command::Server(args) => run_server(args),
        Command::Client(args) => run_client_cmd(args),
        Command::Job(args) => run_job_cmd(args, credentials),
    }
}

/// Writes everything to both writers (the job's log goes to the console and to its file).
struct Tee<A, B>(A, B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // a full console must not lose the file's copy, nor the other way round
        let a = self.0.write_all(buf);
        let b = self.1.write_all(buf);
        a.and(b).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let a = self.0.flush();
        let b = self.1.flush();
        a.and(b)
    }
}

fn run_job_cmd(args: JobArgs, credentials: Credentials) -> ExitCode {
    let args = match WorkerArgs::parse(args.options, credentials) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fedrun job: error: {e}");
            return ExitCode::from(2);
        }
    };
    // Logs at info by default, to standard error (the client parent's console) and to the
    // job's own log file `<ws>/<job>/log.txt`, where NVFlare's job process writes its log.
    let log_file = args.workspace.join(&args.job_id).join("log.txt");
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
    {
        Ok(file) => {
            logger.target(env_logger::Target::Pipe(Box::new(Tee(
                std::io::stderr(),
                file,
            ))));
        }
        Err(e) => eprintln!(
            "fedrun job: cannot write {} ({e}); logging to standard error only",
            log_file.display()
        ),
    }
    logger.init();
    let site = args.client_name.clone();
    let job_id = args.job_id.clone();
    let options = match JobOptions::from_env() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("fedrun job: error: {e}");
            return ExitCode::from(2);
        }
    };
    match actix::System::new().block_on(run_job(args, options)) {
        Ok(report) => {
            let code = report.exit_code();
            log::info!(
                "[job={job_id} site={site}] fedrun job exits with {code} ({:?})",
                report.outcome.ended_by
            );
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("fedrun job {site} {job_id}: error: {e}");
            ExitCode::FAILURE
        }
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

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Prints a finished run: summary line, per-round table, workspace and files.
///
/// Writes go through `writeln!` rather than `println!`: when stdout is a closed pipe
/// (`fedrun simulate | head -1`) the rest of the report is dropped instead of panicking.
fn print_report(report: &SimulationReport) {
    let mut out = std::io::stdout().lock();
    let _ = write_report(&mut out, report);
}

fn write_report(out: &mut impl Write, report: &SimulationReport) -> std::io::Result<()> {
    writeln!(
        out,
        "job {} ({}), {} clients, {} round(s) in {:.2} s: {}",
        report.job_name,
        report.job_id,
        report.sites.len(),
        report.round_metrics.len(),
        report.elapsed.as_secs_f64(),
        report.status
    )?;
    write!(out, "{}", format_table(&report.rounds()))?;
    writeln!(out, "workspace: {}", report.workspace.display())?;
    for file in &report.files {
        writeln!(out, "  {}", file.display())?;
    }
    out.flush()
}

fn run_simulate(args: SimulateArgs) -> ExitCode {
    let options = SimulateOptions {
        clients: args.clients,
        rounds: args.rounds,
        workspace: args.workspace,
        job: args.job,
        seed: args.seed,
    };
    let transport = args.transport;
    let bar = progress_bar();
    let mut observer = ProgressObserver { bar: bar.clone() };
    let result = actix::System::new().block_on(async {
        let mut setup = SimulationSetup::from_options(&options)?;
        setup.transport = transport;
        simulate_setup(setup, &mut observer).await
    });
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            print_report(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The message already names its cause (CliError's messages embed their sources).
            eprintln!("fedrun simulate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_server(args: ServerArgs) -> ExitCode {
    let options = ServerOptions {
        listen: args.listen,
        tls: args.tls,
        clients: args.clients,
        rounds: args.rounds,
        job: args.job,
        workspace: args.workspace,
        job_id: args.job_id,
        timeout: Duration::from_secs(args.timeout),
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        end_of_run_deadline: DEFAULT_END_OF_RUN_DEADLINE,
        client_grace: Duration::from_secs(args.client_grace),
    };
    let bar = progress_bar();
    let mut observer = ProgressObserver { bar: bar.clone() };
    let result = actix::System::new().block_on(serve(options, &mut observer, |run| {
        // Scripts and tests read this line for the port and the job id: flush it at once.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening {} job {}", run.url(), run.job_id());
        let _ = out.flush();
    }));
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            print_report(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fedrun server: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_client_cmd(args: ClientArgs) -> ExitCode {
    let options = ClientOptions {
        job: args.job,
        seed: args.seed,
        timeout: Duration::from_secs(args.timeout),
        tls: args.tls,
        ..ClientOptions::new(&args.server, &args.name, &args.job_id)
    };
    match actix::System::new().block_on(run_client(options)) {
        Ok(outcome) => {
            // A closed stdout must not turn a finished run into a panic.
            let _ = writeln!(
                std::io::stdout().lock(),
                "{} (job {}): run ended by the server; {} task(s), {} result(s) sent",
                args.name,
                args.job_id,
                outcome.tasks_done,
                outcome.results_sent
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fedrun client {}: error: {e}", args.name);
            ExitCode::FAILURE
        }
    }
}
