//! Logging with `tracing`, to a file and never to stdout (stdout carries the CNI result).

use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{parse_log_level, LogLevel, LogRotation, DEFAULT_LOG_FILE};

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
    }
}

/// Rotates the log at `path` when it has reached the size: `<path>.1`
/// becomes `<path>.2` and so on up to the count (the oldest is dropped),
/// and `<path>` becomes `<path>.1`. Concurrent plugins may both rotate; the
/// second only moves a file that has just started, and nothing is lost but
/// the oldest file. A failure is reported and logging goes on.
pub fn rotate(path: &Path, rotation: LogRotation) -> Result<bool, String> {
    let max = rotation.max_mib.saturating_mul(1 << 20);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.len() >= max => {}
        _ => return Ok(false),
    }
    let numbered = |n: u64| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    for n in (1..rotation.keep).rev() {
        match std::fs::rename(numbered(n), numbered(n + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("moving {}: {e}", numbered(n).display()))
            }
            _ => {}
        }
    }
    std::fs::rename(path, numbered(1)).map_err(|e| format!("moving {}: {e}", path.display()))?;
    Ok(true)
}

/// Sends logs to `path` (appending, created 0640 with its directory, rotated
/// first when full), or to stderr when it is stdout, a link, not a regular
/// file or cannot be opened. Only the first call takes effect.
pub fn init_file(path: &Path, level: LogLevel, rotation: LogRotation) {
    let rotated = if crate::fsutil::is_stdout(path) {
        Ok(false)
    } else {
        rotate(path, rotation)
    };
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
        match rotated {
            Ok(true) => {
                tracing::info!(log_file_path = %path.display(), "rotated the log file (log_file_max_size)")
            }
            Ok(false) => {}
            Err(why) => {
                tracing::warn!(log_file_path = %path.display(), %why, "cannot rotate the log file")
            }
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
    let number = |field: &str, range: std::ops::RangeInclusive<u64>, default: u64| {
        raw.get(field)
            .and_then(Value::as_u64)
            .filter(|n| range.contains(n))
            .unwrap_or(default)
    };
    let rotation = LogRotation {
        max_mib: number(
            "log_file_max_size",
            1..=10_240,
            LogRotation::DEFAULT.max_mib,
        ),
        keep: number("log_file_max_count", 1..=100, LogRotation::DEFAULT.keep),
    };
    init_file(Path::new(path), level, rotation);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_is_rotated_and_the_oldest_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("cni.log");
        let small = LogRotation {
            max_mib: 1,
            keep: 2,
        };
        assert_eq!(rotate(&log, small), Ok(false), "no file: nothing to do");
        std::fs::write(&log, vec![b'a'; 1000]).expect("write");
        assert_eq!(rotate(&log, small), Ok(false), "below the size");
        for fill in [b'a', b'b', b'c'] {
            std::fs::write(&log, vec![fill; 1 << 20]).expect("write");
            assert_eq!(rotate(&log, small), Ok(true));
            assert!(!log.exists(), "a new file starts");
        }
        let read = |n: &str| std::fs::read(dir.path().join(n)).map(|b| b[0]).ok();
        assert_eq!(read("cni.log.1"), Some(b'c'), "the newest is .1");
        assert_eq!(read("cni.log.2"), Some(b'b'));
        assert_eq!(read("cni.log.3"), None, "only log_file_max_count are kept");
        // A link is never followed or moved.
        std::os::unix::fs::symlink(dir.path().join("cni.log.1"), &log).expect("link");
        assert_eq!(rotate(&log, small), Ok(false));
    }
}
