//! The CNI protocol as the runtime speaks it: the network config on stdin (`config`), the
//! `CNI_*` environment (`env`), errors and their codes (`error`), spec versions (`version`).
//! Nothing here talks to the agent.

pub mod config;
pub mod env;
pub mod error;
pub mod version;

/// What to print on success.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Nothing,
    Text(String),
}
