//! Pure values: a pod's annotations and the node's defaults become a plan (`plan`), and a plan
//! lowers to a table of chains and rules with its owner (`ruleset`). No I/O.

pub mod plan;
pub mod ruleset;
