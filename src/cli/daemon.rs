//! `calico-ipsec agent`, `manager`, `enable` and `disable`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::{CliError, EtcdArgs};
use crate::config::{ConfigError, PluginConfig, DEFAULT_KEK_FILE};
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{IpsecStore, IpsecStoreError, Phase};

/// Arguments of `calico-ipsec agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// etcd access; when given, overrides the conflist entry's.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Our conflist entry: a conflist holding it, or the entry alone. When
    /// absent, the first *.conflist in --conf-dir holding one is used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where Calico's conflist lives. Without --config, the agent also keeps
    /// our entry in it: when calico-node rewrites the file, the entry is put back.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// Leave Calico's conflist alone even when it loses our entry.
    #[arg(long)]
    pub no_conflist_repair: bool,
    /// The KEK file; overrides the entry's kek_file.
    #[arg(long)]
    pub kek_file: Option<PathBuf>,
    /// The mounted KEK Secret (kubelet's `..data` layout): the agent keeps
    /// the plugin's copy (the entry's kek_file) equal to it, atomically, so
    /// that a KEK changed in the Secret reaches the plugin without a restart.
    #[arg(long)]
    pub kek_from: Option<PathBuf>,
    /// This node's name; overrides the entry's nodename.
    #[arg(long, env = "NODENAME")]
    pub nodename: Option<String>,
    /// Address for /metrics, /livez and /readyz ("none" to serve nothing).
    #[arg(long, default_value = "0.0.0.0:9094")]
    pub listen: String,
    /// How long etcd may be unreachable before /readyz fails, in seconds.
    #[arg(long, default_value_t = 30)]
    pub stale_grace_seconds: u64,
    /// TTL of the status record's lease, in seconds.
    #[arg(long, default_value_t = 30)]
    pub lease_ttl_seconds: i64,
    /// Full re-convergence period without events, in seconds.
    #[arg(long, default_value_t = 60)]
    pub resync_seconds: u64,
}

/// Arguments of `calico-ipsec manager`.
#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// etcd access.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The KEK file, to seal new epochs.
    #[arg(long, default_value = DEFAULT_KEK_FILE)]
    pub kek_file: PathBuf,
    /// This manager's name in the leader record (default: POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub id: Option<String>,
    /// Address for /metrics, /livez and /readyz ("none" to serve nothing).
    #[arg(long, default_value = "0.0.0.0:9095")]
    pub listen: String,
    /// TTL of the leadership lease, in seconds: how long a dead leader blocks.
    #[arg(long, default_value_t = 15)]
    pub lease_ttl_seconds: i64,
    /// How often the leader checks for steps that fall due with time (an
    /// overlap over, a rotation due), in milliseconds; changes in etcd are
    /// acted on as they arrive.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

/// Arguments of `calico-ipsec enable` and `disable`.
#[derive(Debug, Args)]
pub struct PhaseArgs {
    /// etcd access.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Wait until the manager has taken the cluster there.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
}

fn listen_addr(s: &str) -> Result<Option<SocketAddr>, CliError> {
    if s == "none" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| {
        CliError::Config(ConfigError::Invalid {
            field: "listen",
            problem: format!("{s:?} is not an address:port ({e})"),
        })
    })
}

/// Finds our entry: `--config`, else the first conflist in `dir` holding one.
fn find_entry(config: Option<&Path>, dir: &Path) -> Result<PluginConfig, CliError> {
    if let Some(p) = config {
        return super::converge::load_entry(p);
    }
    for path in crate::install::conflists(dir)? {
        let text = std::fs::read_to_string(&path)?;
        if crate::install::conflist::has_ours(&text).unwrap_or(false) {
            return super::converge::load_entry(&path);
        }
    }
    Err(CliError::Config(ConfigError::Invalid {
        field: "conf-dir",
        problem: format!(
            "no *.conflist in {} has a calico-ipsec entry: run `calico-ipsec install` first, or pass --config",
            dir.display()
        ),
    }))
}

/// Runs `calico-ipsec agent`.
pub fn exec_agent(args: &AgentArgs) -> Result<(), CliError> {
    let repair = args.config.is_none() && !args.no_conflist_repair;
    let mut cfg = match find_entry(args.config.as_deref(), &args.conf_dir) {
        // calico-node may have rewritten the conflist since `install` ran.
        Err(e) if repair => {
            use crate::agent::conflist_watch::{Outcome, Repairer};
            match Repairer::new(&args.conf_dir).check() {
                Ok(Outcome::Repaired(path)) => {
                    tracing::warn!(conflist = %path.display(), "the conflist had lost the calico-ipsec entry; put it back as install writes it");
                    find_entry(None, &args.conf_dir)?
                }
                _ => return Err(e),
            }
        }
        r => r?,
    };
    if let Some(k) = &args.kek_file {
        cfg.kek_file = k.clone();
    }
    if let Some(n) = &args.nodename {
        cfg.nodename = Some(crate::config::validate_nodename(n)?);
    }
    if args.etcd.etcd_endpoints.is_some() {
        let s = args.etcd.settings()?;
        cfg.etcd = s.config;
    }
    let opts = crate::agent::AgentOptions {
        kek_from: args.kek_from.clone(),
        cfg,
        listen: listen_addr(&args.listen)?,
        conf_dir: repair.then(|| args.conf_dir.clone()),
        stale_grace: Duration::from_secs(args.stale_grace_seconds),
        lease_ttl: args.lease_ttl_seconds.max(2),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    crate::agent::run(opts).map_err(|e| CliError::Io(std::io::Error::other(e.to_string())))
}

/// Runs `calico-ipsec manager`.
pub fn exec_manager(args: &ManagerArgs) -> Result<(), CliError> {
    let id = match &args.id {
        Some(i) => i.clone(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        }
    };
    let opts = crate::manager::ManagerOptions {
        etcd: args.etcd.settings()?,
        kek_file: args.kek_file.clone(),
        id,
        lease_ttl: args.lease_ttl_seconds.max(2),
        interval: Duration::from_millis(args.interval_ms.max(10)),
        listen: listen_addr(&args.listen)?,
    };
    crate::manager::run(opts).map_err(|e| CliError::Io(std::io::Error::other(e.to_string())))
}

/// Runs `calico-ipsec enable` (target enforce) or `disable` (target off).
pub fn exec_phase(args: &PhaseArgs, target: Phase, out: &mut dyn Write) -> Result<(), CliError> {
    let rt = crate::runtime::current_thread()?;
    rt.block_on(async {
        let etcd = Etcd::connect(&args.etcd.settings()?).await?;
        let cfg = IpsecStore::new(&etcd).set_target_phase(target).await?;
        let name = |p: Phase| format!("{p:?}").to_lowercase();
        writeln!(
            out,
            "target phase {} (now {}); the manager moves one phase at a time as every live node acknowledges",
            name(cfg.target_phase),
            name(cfg.phase)
        )?;
        if args.wait {
            wait_for_target(&etcd, args.timeout_seconds, out).await?;
        }
        Ok(())
    })
}

/// Whether a failed read is etcd being slow or away, which a wait rides
/// out until its own timeout, rather than an answer.
fn passing(e: &IpsecStoreError) -> bool {
    matches!(e, IpsecStoreError::Etcd(_))
}

/// Waits until the phase reaches the target, printing what the manager
/// says it waits for whenever that changes; on timeout, fails with it. A
/// slow or failed etcd read is reported once and ridden out until the
/// timeout (the cluster goes on moving meanwhile).
async fn wait_for_target(etcd: &Etcd, timeout: u64, out: &mut dyn Write) -> Result<(), CliError> {
    let name = |p: Phase| format!("{p:?}").to_lowercase();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut said = String::new();
    let mut asked = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut failing: Option<String> = None;
    loop {
        let cfg = match crate::manager::wait_for_phase(etcd, Duration::ZERO).await {
            Ok(cfg) => {
                if failing.take().is_some() {
                    writeln!(out, "etcd answers again")?;
                }
                cfg
            }
            Err(e) if passing(&e) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(CliError::Io(std::io::Error::other(format!(
                        "no answer from etcd at the end of the {timeout}s wait: {e}"
                    ))));
                }
                if failing.is_none() {
                    writeln!(out, "etcd read failed ({e}); still waiting")?;
                }
                failing = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if cfg.phase == cfg.target_phase {
            writeln!(out, "phase {} reached", name(cfg.phase))?;
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= asked || now >= deadline {
            asked = now + Duration::from_secs(2);
            let why = match crate::manager::explain(etcd).await {
                Ok(why) => why,
                Err(e) if passing(&e) && now < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if now >= deadline {
                return Err(CliError::Io(std::io::Error::other(format!(
                    "the cluster is still at phase {} after {timeout}s: {why}",
                    name(cfg.phase)
                ))));
            }
            if why != said {
                writeln!(out, "phase {}: {why}", name(cfg.phase))?;
                said = why;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
