//! The catch-all's place in a convergence: restored from this node's state
//! after a reboot, and written through `nft` only when it changed.

use super::error::ConvergeError;
use super::facts::Facts;
use crate::datastore::ipsec::Phase;
use crate::state::{GuardMark, NodeState};
use crate::xfrm::guard::{self as nft, Guard, GuardError, REASSERT};

/// Writes the guard unless this node's state says this same guard was
/// written in this boot (and, with `reassert`, less than [`REASSERT`]
/// ago). The ADD passes no `reassert`: it writes only a changed guard, so
/// `nft` stays off a pod's critical path. At `encrypt` and above a guard
/// that cannot be written fails the convergence: without it, a path no
/// policy covers could leave in clear. Below, a failure is only logged.
pub(super) fn sync(
    state: &mut NodeState,
    facts: &Facts,
    reassert: bool,
) -> Result<(), ConvergeError> {
    match write(state, &facts.guard, &facts.boot, reassert) {
        Ok(_) => Ok(()),
        Err(e) if facts.phase < Phase::Encrypt => {
            tracing::warn!(error = %e, "cannot remove the nftables catch-all");
            Ok(())
        }
        Err(e) => Err(ConvergeError::Guard(e)),
    }
}

/// Whether `nft` must run for a guard whose script has `digest`: unless the
/// mark says this same guard was written in this boot and, for a
/// non-empty guard with `reassert`, less than [`REASSERT`] ago. An empty
/// guard, once removed, stays removed: it is not reasserted (a node in
/// MTU-only mode runs no `nft` after the first time).
fn needs_write(
    mark: Option<&GuardMark>,
    digest: &str,
    boot: &str,
    empty: bool,
    reassert: bool,
) -> bool {
    !mark.is_some_and(|m| {
        m.digest == digest && m.boot == boot && (empty || !reassert || m.fresh(REASSERT))
    })
}

/// Runs `nft` for `g` when needed; returns whether it ran.
fn write(state: &mut NodeState, g: &Guard, boot: &str, reassert: bool) -> Result<bool, GuardError> {
    let script = g.script();
    let digest = nft::digest_of(&script);
    if !needs_write(state.guard(), &digest, boot, g.is_empty(), reassert) {
        return Ok(false);
    }
    // Whatever happens, the old mark no longer vouches for the table.
    state.keep_guard(None, None);
    // An empty guard on a node without `nft` is nothing to do (there is
    // no table to remove).
    if !(g.is_empty() && nft::nft_binary().is_none()) {
        match nft::run_nft(&script) {
            Ok(()) => {}
            // Removing the table fails only where nftables cannot be used
            // at all, and then there is no table: nothing is left.
            Err(e) if g.is_empty() => {
                tracing::debug!(error = %e, "no nftables guard to remove");
            }
            Err(e) => return Err(e),
        }
    }
    let kept = if g.is_empty() { "" } else { script.as_str() };
    state.keep_guard(Some(GuardMark::now(digest, boot)), Some(kept));
    Ok(true)
}

/// Puts the last guard written back when this boot has not written it yet
/// (a reboot emptied nftables), or always with `force` (the agent's start:
/// the table may have gone without a reboot, and replacing it with the same
/// one costs one `nft` run): before etcd is read, so that a node that
/// enforced encryption never starts in clear. A failure is logged, and the
/// convergence that follows writes the guard or fails.
pub fn restore(state: &mut NodeState, force: bool) {
    let boot = crate::clock::read_boot_id().unwrap_or_default();
    if !force && state.guard().is_some_and(|m| m.boot == boot) {
        return;
    }
    let Some(script) = state.guard_script() else {
        return;
    };
    if !nft::is_ours(&script) {
        tracing::warn!("the kept catch-all script is not one of ours; not restored");
        return;
    }
    if let Err(e) = nft::run_nft(&script) {
        tracing::error!(error = %e, "cannot restore the nftables catch-all kept from before this boot");
        return;
    }
    // This boot now holds it: the next ADD need not restore it again.
    state.keep_guard(Some(GuardMark::now(nft::digest_of(&script), &boot)), None);
    tracing::warn!(
        "restored the nftables catch-all kept from before this boot; etcd decides what follows"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(digest: &str, boot: &str, age: u64) -> GuardMark {
        let mut m = GuardMark::now(digest.into(), boot);
        m.at -= age;
        m
    }

    #[test]
    fn nft_runs_for_a_change_a_reboot_or_an_old_reassertion_only() {
        let old = REASSERT.as_secs() + 1;
        // Nothing recorded: write.
        assert!(needs_write(None, "d", "b1", false, false));
        // The same guard in this boot: the ADD skips it, however old.
        assert!(!needs_write(
            Some(&mark("d", "b1", old)),
            "d",
            "b1",
            false,
            false
        ));
        // The agent reasserts an old one, not a fresh one.
        assert!(needs_write(
            Some(&mark("d", "b1", old)),
            "d",
            "b1",
            false,
            true
        ));
        assert!(!needs_write(
            Some(&mark("d", "b1", 0)),
            "d",
            "b1",
            false,
            true
        ));
        // An empty guard, once removed, is never reasserted.
        assert!(!needs_write(
            Some(&mark("e", "b1", old)),
            "e",
            "b1",
            true,
            true
        ));
        // Another script, or another boot (a reboot emptied nftables): write.
        assert!(needs_write(
            Some(&mark("d", "b1", 0)),
            "d2",
            "b1",
            false,
            false
        ));
        assert!(needs_write(
            Some(&mark("d", "b0", 0)),
            "d",
            "b1",
            false,
            false
        ));
        assert!(needs_write(
            Some(&mark("e", "b0", 0)),
            "e",
            "b1",
            true,
            false
        ));
    }
}
