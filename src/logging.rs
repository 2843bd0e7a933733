//! Logging with `tracing`, to a file and never to stdout (stdout carries the CNI result).

use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{parse_log_level, LogLevel, DEFAULT_LOG_FILE};

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
    }
}

/// Sends logs to `path` (appending, created 0640 with its directory), or to
/// stderr when it is stdout, a link, not a regular file or cannot be opened.
/// Only the first call takes effect.
pub fn init_file(path: &Path, level: LogLevel) {
    let file = if crate::fsutil::is_stdout(path) {
        Err(format!(
            "{} is this process's stdout, which carries the CNI result",
            path.display()
        ))
    } else {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        crate::fsutil::open_log(path).map_err(|e| e.to_string())
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level_filter(level))
        .with_ansi(false)
        .with_target(false);
    let (result, refused) = match file {
        Ok(f) => (builder.with_writer(Mutex::new(f)).try_init(), None),
        Err(e) => (builder.with_writer(std::io::stderr).try_init(), Some(e)),
    };
    // Already initialised (tests run many requests in one process): keep it.
    if result.is_ok() {
        if let Some(why) = refused {
            tracing::warn!(log_file_path = %path.display(), %why, "not logging to log_file_path; logging to stderr");
        }
    }
}

/// Sends logs to stderr, for CLI commands.
pub fn init_stderr(level: LogLevel) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level_filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Initialises logging from a raw plugin config before it is validated, so
/// that even an invalid config is logged; bad values fall back to defaults.
pub fn init_from_raw(raw: &Map<String, Value>) {
    let path = raw
        .get("log_file_path")
        .and_then(Value::as_str)
        .filter(|p| p.starts_with('/'))
        .unwrap_or(DEFAULT_LOG_FILE);
    let level = raw
        .get("log_level")
        .and_then(Value::as_str)
        .and_then(|s| parse_log_level(s).ok())
        .unwrap_or(LogLevel::Info);
    init_file(Path::new(path), level);
}
