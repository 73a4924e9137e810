//! The CNI spec versions sluice speaks.

/// The newest spec version we implement.
pub const LATEST_VERSION: &str = "1.1.0";
/// Every version we accept on stdin (what VERSION prints).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
