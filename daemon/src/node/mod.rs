//! How the agent sits on the node: the CNI install (`install`), its privileges
//! (`privileges`), the container runtime's sandboxes over CRI (`discovery`), and the
//! reconciler that keeps every pod's capture as planned (`reconcile`), through the agent's
//! verbs.

pub mod discovery;
pub mod install;
pub mod privileges;
pub mod reconcile;
