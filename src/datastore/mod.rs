//! The etcd datastore: Calico's topology (read-only) and our keys under
//! `/calico/ipsec/v1/`.

pub mod aggregate;
pub mod calico;
pub mod epochs;
pub mod etcd;
pub mod ipam;
pub mod ipsec;
pub mod leader;
pub mod paths;
pub mod pubkeys;
pub mod records;
pub mod snapshot;
pub mod watch;
