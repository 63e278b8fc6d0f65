//! `fedrun-cellbench`: fedrun's cellnet benchmarks over loopback TCP, one OS process per cell.
//! See the crate documentation of `fedrun_bench` and `vs-nvflare.sh` beside it.

use std::process::ExitCode;

use fedrun_bench::{node, run_orchestrator, run_table, BenchError, Options, TableOptions, USAGE};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    let outcome: Result<(), BenchError> = match role.as_str() {
        "run" => Options::parse(args).and_then(|o| run_orchestrator(&o).map(|_| ())),
        "cell" => Options::parse(args).and_then(node::run_cell),
        "table" => {
            TableOptions::parse(args).and_then(|o| run_table(&o).map(|text| print!("{text}")))
        }
        _ => Err(BenchError::Usage(format!("unknown role {role:?}"))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedrun-cellbench: {e}");
            if matches!(e, BenchError::Usage(_)) {
                eprintln!("{USAGE}");
            }
            ExitCode::FAILURE
        }
    }
}
