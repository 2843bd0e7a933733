//! `calico-ipsec keys rotate-kek`: a new key-encryption key without an
//! outage, in two steps around the Secret's change.
//!
//! 1. `--new-kek-file F`: every epoch is sealed under the new KEK beside the
//!    old one, so a node opens the epochs with whichever KEK file it holds.
//!    Rotations wait meanwhile (a new epoch could be sealed under one only).
//! 2. The operator replaces the KEK Secret's content; kubelet updates the
//!    mounted file on each node, and each agent reports the new fingerprint
//!    in its status within a heartbeat.
//! 3. `--finish --new-kek-file F`: once every live node reports the new KEK,
//!    the old sealing is dropped (each epoch sealed afresh under the new).

use std::io::Write;
use std::path::Path;

use super::CliError;
use crate::datastore::ipsec::IpsecStore;
use crate::keys::Kek;

/// Runs either step of a KEK rotation.
pub async fn exec(
    store: &IpsecStore<'_>,
    kek_file: &Path,
    new_kek_file: Option<&Path>,
    finish: bool,
    force: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if finish {
        let kept = Kek::load(new_kek_file.unwrap_or(kek_file))?;
        return finish_rotation(store, &kept, force, out).await;
    }
    let kek = Kek::load(kek_file)?;
    let Some(new_file) = new_kek_file else {
        return Err(CliError::Refused(
            "give --new-kek-file (start) or --finish (end)".into(),
        ));
    };
    let new = if new_file.exists() {
        Kek::load(new_file)?
    } else {
        let k = Kek::generate()?;
        k.write_new(new_file)?;
        writeln!(out, "wrote a new KEK to {}", new_file.display())?;
        k
    };
    if new.fingerprint() == kek.fingerprint() {
        return Err(CliError::Refused(format!(
            "{} holds the current KEK (fingerprint {}): give a new one",
            new_file.display(),
            kek.fingerprint()
        )));
    }
    let epochs = store.reseal_beside(&kek, &new).await?;
    writeln!(
        out,
        "epochs {epochs:?} are now sealed under KEK {} and KEK {}; rotations wait until the end",
        kek.fingerprint(),
        new.fingerprint()
    )?;
    writeln!(
        out,
        "next: put {} in the KEK Secret (nodes and manager), then run \
         `calico-ipsec keys rotate-kek --finish --new-kek-file {}`: it names the nodes \
         not yet on KEK {}, and changes nothing until there are none",
        new_file.display(),
        new_file.display(),
        new.fingerprint()
    )?;
    Ok(())
}

async fn finish_rotation(
    store: &IpsecStore<'_>,
    kek: &Kek,
    force: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let fp = kek.fingerprint();
    let behind: Vec<String> = store
        .statuses()
        .await?
        .into_iter()
        .filter(|(_, s)| s.kek != fp)
        .map(|(n, s)| {
            let held = if s.kek.is_empty() {
                "none reported"
            } else {
                &s.kek
            };
            format!("{} ({held})", n.escape_debug())
        })
        .collect();
    if !behind.is_empty() && !force {
        return Err(CliError::Refused(format!(
            "{} live node(s) do not hold KEK {fp} yet: {}; wait for the Secret to reach them (or --force)",
            behind.len(),
            behind.join(", ")
        )));
    }
    let epochs = store.reseal_only(kek).await?;
    writeln!(
        out,
        "epochs {epochs:?} are now sealed under KEK {fp} only; the old KEK can be destroyed"
    )?;
    Ok(())
}
