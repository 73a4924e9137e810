//! CNI errors: the spec's codes, ours (100+), and the JSON the runtime reads from stdout.

use serde::Serialize;

pub use sluice_proto::cni_code::{
    AGENT_FAILED, DECODE_FAILURE, DRIFT, INCOMPATIBLE_VERSION, INVALID_ENV, NOT_AVAILABLE,
    TRY_AGAIN_LATER,
};

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
            cni_version: super::version::LATEST_VERSION.to_owned(),
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
        if super::version::SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_owned();
        }
        self
    }
}
