//! `calico-ipsec install` and `uninstall`: our entry in Calico's conflist, the
//! binary in the CNI bin dir, and the KEK file on the node.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use super::CliError;
use crate::config::PluginConfig;
use crate::datastore::calico::RESOURCES;
use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::install::conflist::{self, ETCD_FIELDS};
use crate::install::owner::{DaemonSetState, KubeApi};
use crate::install::{self as inst, Edit, InstallError, InstallFileError, InstallOptions, Outcome};

/// Arguments of `calico-ipsec install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The CNI config directory holding Calico's conflist.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// Also copy this binary to BIN_DIR/calico-ipsec (mode 0755), e.g. /opt/cni/bin.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// `kek_file` for our entry [default: /etc/cni/net.d/calico-ipsec/kek; an existing entry keeps its own].
    #[arg(long)]
    pub kek_file: Option<String>,
    /// Copy the KEK from this file (e.g. the mounted Secret) to the entry's `kek_file`, mode 0600.
    #[arg(long)]
    pub kek_from: Option<PathBuf>,
    /// Do not read Calico's FelixConfiguration from etcd to rule out WireGuard;
    /// only the local check (a WireGuard interface on this node) is made.
    #[arg(long)]
    pub skip_datastore_check: bool,
    /// Bound on connecting to etcd and on each request, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub etcd_timeout_ms: u64,
    /// Print the conflist as it would be written, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where this node's network interfaces are listed (for tests).
    #[arg(long, default_value = "/sys/class/net", hide = true)]
    pub sys_class_net: PathBuf,
}

/// Arguments of `calico-ipsec uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The CNI config directory; our entry is removed from every `*.conflist` in it.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// Also remove BIN_DIR/calico-ipsec (the binary `install --bin-dir` copied);
    /// only once no pod created with the entry remains (a runtime that caches
    /// the config runs our DEL for them).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also remove the KEK file named by our entry's `kek_file` (and by --kek-file).
    #[arg(long)]
    pub remove_kek: bool,
    /// With --remove-kek, the KEK file to remove even when no entry names it.
    #[arg(long)]
    pub kek_file: Option<String>,
    /// Accepted so that uninstall takes install's command line; ignored (the source is not ours).
    #[arg(long)]
    pub kek_from: Option<PathBuf>,
    /// Accepted so that uninstall takes install's command line; ignored (uninstall reads no datastore).
    #[arg(long)]
    pub skip_datastore_check: bool,
    /// Accepted so that uninstall takes install's command line; ignored.
    #[arg(long, default_value_t = 2000)]
    pub etcd_timeout_ms: u64,
    /// Accepted so that uninstall takes install's command line; ignored.
    #[arg(long, default_value = "/sys/class/net", hide = true)]
    pub sys_class_net: PathBuf,
    /// Print each conflist as it would be written, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Act only if this DaemonSet (in the pod's namespace) is gone or being
    /// deleted, asked of the Kubernetes API; for the agent's preStop hook.
    #[arg(long, value_name = "NAME")]
    pub only_if_daemonset_deleted: Option<String>,
    /// The Kubernetes API URL [default: from KUBERNETES_SERVICE_HOST and _PORT] (for tests).
    #[arg(long, hide = true)]
    pub kube_api_url: Option<String>,
    /// The service account directory (for tests).
    #[arg(long, hide = true, default_value = crate::install::owner::SERVICE_ACCOUNT_DIR)]
    pub service_account_dir: PathBuf,
}

fn conflist_err(path: &Path) -> impl FnOnce(InstallError) -> InstallFileError + '_ {
    move |source| InstallFileError::Conflist {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, InstallFileError> {
    std::fs::read_to_string(path).map_err(|source| InstallFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `calico-ipsec install`.
pub fn exec_install(args: &InstallArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let path = inst::find_calico_conflist(&args.conf_dir)?;
    let text = read(&path)?;
    let calico = conflist::calico_entry(&text)
        .map_err(conflist_err(&path))?
        .ok_or_else(|| conflist_err(&path)(InstallError::NoCalicoEntry))?;
    conflist::check_calico_entry(&calico).map_err(conflist_err(&path))?;
    check_wireguard(args, &calico)?;

    let opts = InstallOptions {
        kek_file: args.kek_file.clone(),
        ..InstallOptions::default()
    };
    let edit = inst::plan_install(&text, &opts).map_err(conflist_err(&path))?;
    if args.dry_run {
        match &edit {
            Edit::Changed(new) => write!(out, "{new}")?,
            Edit::Unchanged => write!(out, "{text}")?,
        }
        return Ok(());
    }
    let new_text = match edit {
        Edit::Changed(new) => {
            inst::write_atomic(&path, new.as_bytes(), 0o644)?;
            tracing::info!(conflist = %path.display(), "installed the calico-ipsec entry");
            writeln!(
                out,
                "installed: calico-ipsec entry after \"calico\" in {}",
                path.display()
            )?;
            new
        }
        Edit::Unchanged => {
            writeln!(
                out,
                "unchanged: {} already holds the calico-ipsec entry",
                path.display()
            )?;
            text
        }
    };
    // The agent keeps the entry in place again.
    inst::remove_file(&inst::uninstalled_marker(&args.conf_dir))?;

    if let Some(src) = &args.kek_from {
        let kek_file = conflist::our_kek_file(&new_text)
            .map_err(conflist_err(&path))?
            .unwrap_or_else(|| crate::config::DEFAULT_KEK_FILE.to_string());
        let dst = PathBuf::from(kek_file);
        match inst::install_kek(src, &dst)? {
            Outcome::Written => writeln!(out, "installed: KEK {} (0600)", dst.display())?,
            _ => writeln!(out, "unchanged: KEK {}", dst.display())?,
        }
    }
    if let Some(bin_dir) = &args.bin_dir {
        let exe = std::env::current_exe()?;
        let dst = bin_dir.join(inst::PLUGIN_TYPE);
        match inst::install_binary(&exe, bin_dir)? {
            Outcome::Written => writeln!(out, "installed: {} (0755)", dst.display())?,
            _ => writeln!(out, "unchanged: {}", dst.display())?,
        }
    }
    Ok(())
}

/// Refuses when WireGuard is on: a WireGuard interface on this node, or a
/// FelixConfiguration in etcd that enables it.
fn check_wireguard(args: &InstallArgs, calico: &Map<String, Value>) -> Result<(), CliError> {
    let ifaces = inst::wireguard_interfaces(&args.sys_class_net);
    if !ifaces.is_empty() {
        return Err(InstallFileError::Refused(InstallError::WireGuard {
            evidence: format!("this node has the interface {}", ifaces.join(", ")),
        })
        .into());
    }
    if args.skip_datastore_check {
        tracing::warn!("skipping the FelixConfiguration check for WireGuard");
        return Ok(());
    }
    // Only the etcd fields: Calico's other fields are not ours to validate.
    let etcd_only: Map<String, Value> = ETCD_FIELDS
        .iter()
        .filter_map(|f| calico.get(*f).map(|v| ((*f).to_string(), v.clone())))
        .collect();
    let cfg = PluginConfig::from_json(&etcd_only)
        .map_err(|source| InstallFileError::Refused(InstallError::InvalidEntry { source }))?;
    let settings = EtcdSettings::from_config(
        &cfg.etcd,
        Duration::from_millis(args.etcd_timeout_ms.max(1)),
    );
    let rt = crate::runtime::current_thread()?;
    let found = rt
        .block_on(felix_wireguard(&settings))
        .map_err(InstallFileError::Datastore)?;
    match found {
        Some(evidence) => {
            Err(InstallFileError::Refused(InstallError::WireGuard { evidence }).into())
        }
        None => Ok(()),
    }
}

/// The first FelixConfiguration that turns WireGuard on, described.
async fn felix_wireguard(
    settings: &EtcdSettings,
) -> Result<Option<String>, crate::datastore::etcd::EtcdError> {
    let etcd = Etcd::connect(settings).await?;
    let prefix = format!("{RESOURCES}felixconfigurations/");
    let (_, kvs) = etcd.get_prefix(&prefix, false).await?;
    Ok(kvs.iter().find_map(|kv| {
        let fields = conflist::felix_wireguard_fields(&kv.value);
        (!fields.is_empty()).then(|| {
            let name = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            let what: Vec<String> = fields.iter().map(|f| format!("spec.{f}")).collect();
            format!(
                "FelixConfiguration {name} sets {} to true",
                what.join(" and ")
            )
        })
    }))
}

/// Runs `calico-ipsec uninstall`.
pub fn exec_uninstall(args: &UninstallArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if let Some(name) = &args.only_if_daemonset_deleted {
        let owner_err = |source| InstallFileError::Owner {
            name: name.clone(),
            source,
        };
        let api = KubeApi::in_cluster(&args.service_account_dir, args.kube_api_url.as_deref())
            .map_err(owner_err)?;
        let state = api
            .daemonset(name, Duration::from_secs(5))
            .map_err(owner_err)?;
        let ns = api.namespace();
        match state {
            DaemonSetState::Live => {
                writeln!(out, "kept: DaemonSet {ns}/{name} is live (a restart or an update), so the calico-ipsec entry stays")?;
                return Ok(());
            }
            DaemonSetState::Deleting => {
                writeln!(out, "DaemonSet {ns}/{name} is being deleted; removing")?;
            }
            DaemonSetState::Gone(code) => {
                writeln!(out, "DaemonSet {ns}/{name} is gone (HTTP {code}); removing")?;
            }
        }
    }
    if !args.dry_run {
        mark_uninstalled(&args.conf_dir)?;
    }
    let mut removed_any = false;
    let mut keks: Vec<String> = args.kek_file.iter().cloned().collect();
    for path in inst::conflists(&args.conf_dir)? {
        let text = read(&path)?;
        // Files that are not ours to judge (malformed, not a conflist) are left alone.
        match conflist::has_ours(&text) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(conflist = %path.display(), error = %e, "skipped");
                continue;
            }
        }
        let kek = conflist::our_kek_file(&text).map_err(conflist_err(&path))?;
        let Edit::Changed(new) = inst::plan_uninstall(&text).map_err(conflist_err(&path))? else {
            continue;
        };
        if args.dry_run {
            write!(out, "{new}")?;
            continue;
        }
        inst::write_atomic(&path, new.as_bytes(), 0o644)?;
        removed_any = true;
        tracing::info!(conflist = %path.display(), "removed the calico-ipsec entry");
        writeln!(out, "removed: calico-ipsec entry from {}", path.display())?;
        keks.extend(kek);
    }
    if args.remove_kek && !args.dry_run {
        keks.sort();
        keks.dedup();
        for kek in keks {
            if inst::remove_file(Path::new(&kek))? == Outcome::Removed {
                writeln!(out, "removed: KEK {kek}")?;
            }
        }
    }
    if let (Some(bin_dir), false) = (&args.bin_dir, args.dry_run) {
        let bin = bin_dir.join(inst::PLUGIN_TYPE);
        if inst::remove_file(&bin)? == Outcome::Removed {
            writeln!(out, "removed: {}", bin.display())?;
        }
    }
    if !removed_any && !args.dry_run {
        writeln!(
            out,
            "unchanged: no conflist in {} holds a calico-ipsec entry",
            args.conf_dir.display()
        )?;
    }
    Ok(())
}

/// Leaves the mark that stops a running agent from putting the entry back,
/// before any entry is removed.
fn mark_uninstalled(conf_dir: &Path) -> Result<(), InstallFileError> {
    let marker = inst::uninstalled_marker(conf_dir);
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).map_err(|source| InstallFileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    inst::write_atomic(
        &marker,
        b"`calico-ipsec uninstall` ran: the agent does not put its conflist entry back; `calico-ipsec install` removes this file\n",
        0o644,
    )
}
