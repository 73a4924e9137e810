//! sluice's node agent as a library. The path of a pod through it reads like the data flow:
//! `service` (gRPC) → `plan` (annotations → pure plan) → `ruleset` (plan → tables/chains/rules,
//! and its `nft` text) → `netns` (enter the pod) → `program` (`nft` batch + `device` setup) →
//! kernel → reply.
//!
//! `unsafe` is denied crate-wide; the only exception is `nft::ffi` (libnftnl calls nftnl does
//! not wrap).
#![deny(unsafe_code)]

pub mod config;
pub mod device;
pub mod discovery;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod ports;
pub mod privileges;
pub mod probe;
pub mod program;
pub mod reconcile;
pub mod registry;
pub mod ruleset;
pub mod server;
pub mod service;
pub mod work;
