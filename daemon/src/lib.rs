//! sluice's node agent as a library. Folders by role, each answering one question:
//!
//! | folder | question | depends on |
//! |---|---|---|
//! | `api/` | how does the outside reach the agent? (gRPC, the socket, metrics, health) | `agent`, top |
//! | `agent/` | what does the agent decide? (attach, detach, check, explain; records; admission) | `kernel`, `model`, top |
//! | `kernel/` | what runs inside a pod's netns? (netns, nft, rtnetlink, sysctls, probe) | `model` |
//! | `model/` | what is the capture, as a value? (plans, rulesets, owners) | — |
//! | `node/` | how does the agent sit on the node? (install, privileges, CRI, reconciler) | `agent`, `kernel`, `model` |
//!
//! Top level: `run` (the process: everything wired together), `config` (flags and file → the
//! pieces above), `metrics` (their definitions), `logging`. Imports point one way, down this table; `tests/tests/house.rs` checks it.
//!
//! One pod's path: the runtime runs `sluice-cni`, which calls `Attach` over the unix socket →
//! `api::server` (peer uid vetted) → `api::grpc` (deadline from `grpc-timeout`) →
//! `agent::attach` (decides the plan from the annotations: `model::plan` → `model::ruleset`;
//! vets and opens the netns: `kernel::netns`; waits its turn: `agent::work`) → on a netns
//! worker, `kernel::capture::attach`: the table in one batch (`kernel::nft`), then `lo`,
//! `::6`, TPROXY routing and sysctls (`kernel::device`), rolled back on failure → the record
//! (`agent::registry`) → the reply, mapped to a status (`api::grpc`) and by the plugin to a
//! CNI result. Later, `node::reconcile` compares the pod with its plan through the same
//! `kernel::capture` steps, under the same per-pod lock.
//!
//! `unsafe` is denied crate-wide; the only exceptions are `kernel::nft::ffi` (libnftnl calls
//! nftnl does not wrap) and `kernel::netns` (`setns`).
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod config;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod node;
pub mod run;
