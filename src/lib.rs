//! calico-ipsec: encrypts Calico pod traffic between nodes with kernel IPsec.
//!
//! One binary: a chained CNI plugin (`cni`), and a CLI (`cli`). Each module
//! owns one concern; data flows from configuration and the datastore to a
//! desired state, and only the kernel-facing modules write to the kernel.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod clock;
pub mod cni;
pub mod config;
pub mod converge;
pub mod datastore;
pub mod fsutil;
/// Installing on a node: our conflist entry, the binary and the KEK file.
pub mod install;
pub mod keys;
pub mod link;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod mtu;
pub mod netlink;
pub mod netns;
pub mod podmtu;
pub mod runtime;
pub mod state;
pub mod xfrm;
