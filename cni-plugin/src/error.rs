//! CNI errors: the spec's codes, ours (100+), and the JSON the runtime reads from stdout.

use serde::Serialize;

/// CNI spec: the config's cniVersion is not one we support.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// CNI spec: a required environment variable is missing or malformed.
pub const INVALID_ENV: u32 = 4;
/// CNI spec: the container (its netns) is unknown or does not exist.
pub const UNKNOWN_CONTAINER: u32 = 3;
/// CNI spec: stdin could not be decoded.
pub const DECODE_FAILURE: u32 = 6;
/// CNI spec: the network config (here: a pod annotation) is invalid.
pub const INVALID_CONFIG: u32 = 7;
/// CNI spec: transient; the runtime should retry (the agent is unreachable or timed out).
pub const TRY_AGAIN_LATER: u32 = 11;
/// CNI spec (STATUS): the plugin cannot serve new pods.
pub const NOT_AVAILABLE: u32 = 50;
/// sluice: CHECK found our table missing or different from the plan.
pub const DRIFT: u32 = 100;
/// sluice: the agent failed while programming the pod (see the message).
pub const AGENT_FAILED: u32 = 101;
/// sluice: the agent refused this plugin's credentials (SO_PEERCRED allow-list).
pub const PERMISSION_DENIED: u32 = 102;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: crate::conf::LATEST_VERSION.to_owned(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Errors are reported in the config's version when it is one we speak.
    pub fn in_version(mut self, version: &str) -> Self {
        if crate::conf::SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_owned();
        }
        self
    }
}
