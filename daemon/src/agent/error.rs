//! What can go wrong in a verb, in the agent's own terms: each variant says who can fix it
//! (the caller's input, time, the agent's resources, the kernel). The adapters map them: the
//! gRPC service to a status (and the plugin to a CNI code), the reconciler to a log line.

use crate::agent::work::WorkError;
use crate::kernel::capture::ProgramError;
use crate::kernel::netns::NetnsError;
use crate::model::plan::PlanError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A field of the request is invalid (`netns`, `container_id`, `pod_ips`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// An annotation the plan refuses; nothing was applied.
    #[error(transparent)]
    Annotation(PlanError),
    /// What the request names does not exist (its netns; a container with no record).
    #[error("{message}")]
    NotFound {
        field: &'static str,
        message: String,
    },
    /// The call's deadline passed, or the kernel did not answer a step in time: try again.
    #[error("{0}")]
    Deadline(String),
    /// Too much work is queued: try again.
    #[error("{0}")]
    Saturated(String),
    /// The agent is short of something that comes back (threads, file descriptors), or is
    /// shutting down: try again.
    #[error("{0}")]
    Unavailable(String),
    /// The kernel refused or failed a step.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        AgentError::Invalid {
            field: field.to_owned(),
            message: message.to_string(),
        }
    }

    /// The input the error is about, as the `sluice-field` metadata names it.
    pub fn field(&self) -> Option<String> {
        match self {
            AgentError::Invalid { field, .. } => Some(field.clone()),
            AgentError::Annotation(e) => Some(format!("annotation:{}", e.annotation)),
            AgentError::NotFound { field, .. } => Some((*field).to_owned()),
            _ => None,
        }
    }

    pub fn plan(e: PlanError) -> Self {
        AgentError::Annotation(e)
    }

    pub fn netns(e: NetnsError) -> Self {
        match e {
            NetnsError::Gone(_) => AgentError::NotFound {
                field: "netns",
                message: e.to_string(),
            },
            e if e.is_invalid_input() => AgentError::invalid("netns", e),
            e if e.is_transient() => AgentError::Unavailable(e.to_string()),
            e => AgentError::Internal(e.to_string()),
        }
    }

    pub fn work(e: WorkError) -> Self {
        match e {
            WorkError::Saturated { .. } => AgentError::Saturated(e.to_string()),
            // The wait is bounded by the call's deadline: running out of it is the deadline.
            WorkError::WaitedTooLong(_) => AgentError::Deadline(e.to_string()),
            _ => AgentError::Unavailable(e.to_string()),
        }
    }

    /// A kernel step's failure, described by `message` (which names the pod and the step).
    pub fn program(e: &ProgramError, message: String) -> Self {
        if let ProgramError::Plan(p) = e {
            return AgentError::Annotation(p.clone());
        }
        if e.is_timeout() {
            AgentError::Deadline(message)
        } else if e.is_transient() {
            AgentError::Unavailable(message)
        } else {
            AgentError::Internal(message)
        }
    }
}
