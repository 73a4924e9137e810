//! The CNI_* environment of one invocation.

use super::error::{CniError, INVALID_ENV};

/// The CNI_* environment of one invocation.
#[derive(Debug, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID from CNI_ARGS.
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Env {
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut env = Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            ..Default::default()
        };
        for pair in get("CNI_ARGS").unwrap_or_default().split(';') {
            match pair.split_once('=') {
                Some(("K8S_POD_NAMESPACE", v)) => env.pod_namespace = v.to_owned(),
                Some(("K8S_POD_NAME", v)) => env.pod_name = v.to_owned(),
                Some(("K8S_POD_UID", v)) => env.pod_uid = v.to_owned(),
                _ => {}
            }
        }
        env
    }

    /// ADD and CHECK need a container id and a netns.
    pub fn require_attach_fields(&self) -> Result<(), CniError> {
        for (name, value) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
        ] {
            if value.is_empty() {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("{name} is required for {}", self.command),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_yield_the_pod_identity() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
            ),
        ];
        let env = Env::from_env(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(
            (
                env.pod_namespace.as_str(),
                env.pod_name.as_str(),
                env.pod_uid.as_str()
            ),
            ("ns", "web-0", "u-1")
        );
    }
}
