//! Entry point: a CNI plugin when `CNI_COMMAND` is set, the CLI otherwise.

use std::io::{Read, Write};
use std::process::ExitCode;

use calico_ipsec::cni::{self, code, CniError, Outcome};
use clap::Parser;

fn main() -> ExitCode {
    // Before any connection: every TLS session takes this build's provider.
    calico_ipsec::keys::crypto::install_tls_provider();
    if std::env::var_os("CNI_COMMAND").is_some() {
        return run_plugin();
    }
    let cli = calico_ipsec::cli::Cli::parse();
    // The daemons log their steps; one-shot commands only warnings.
    let level = match cli.command {
        calico_ipsec::cli::Command::Agent(_) | calico_ipsec::cli::Command::Manager(_) => {
            calico_ipsec::config::LogLevel::Info
        }
        _ => calico_ipsec::config::LogLevel::Warn,
    };
    calico_ipsec::logging::init_stderr(level);
    if let Err(e) = calico_ipsec::keys::crypto::ready(false) {
        eprintln!("calico-ipsec: {e}");
        return ExitCode::FAILURE;
    }
    let mut stdout = std::io::stdout().lock();
    match calico_ipsec::cli::exec(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = stdout.flush();
            eprintln!("calico-ipsec: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_plugin() -> ExitCode {
    let mut input = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut input) {
        Err(e) => Outcome::Failure {
            version: cni::CniVersion::LATEST.as_str().into(),
            error: CniError::new(
                code::UNDECODABLE,
                "cannot read the network configuration from stdin",
                e.to_string(),
            ),
        },
        Ok(_) => {
            let get = |k: &str| std::env::var(k).ok();
            // A panic is a bug; it must still end as a CNI error, not a trace on stdout.
            std::panic::catch_unwind(|| cni::run(&get, &input)).unwrap_or_else(|_| {
                Outcome::Failure {
                    version: cni::CniVersion::LATEST.as_str().into(),
                    error: CniError::new(
                        code::INTERNAL,
                        "calico-ipsec hit an internal error; see its log file and report a bug",
                        "",
                    ),
                }
            })
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Some(v) = outcome.stdout() {
        let _ = writeln!(stdout, "{v}");
    }
    let _ = stdout.flush();
    match outcome {
        Outcome::Success(_) => ExitCode::SUCCESS,
        Outcome::Failure { .. } => ExitCode::FAILURE,
    }
}
