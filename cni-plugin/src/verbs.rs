//! The CNI verbs: what each does for a pod, and which call to the agent it makes.

use sluice_proto::v1::{
    AttachRequest, CheckRequest, DetachRequest, ListRequest, PodRef, StatusRequest,
};

use crate::agent;
use crate::cni::Output;
use crate::cni::config::{self as conf, NetConf};
use crate::cni::env::Env;
use crate::cni::error::*;
use crate::cni::version::{LATEST_VERSION, SUPPORTED_VERSIONS};

/// Whether the agent must see this pod: `sluice.dev/redirect` with any value but `disabled`
/// (a typo in the value is then rejected by the agent instead of silently leaving the pod
/// uncaptured), or a mesh injector's annotation while not explicitly disabled. Every other pod
/// passes through without a call.
fn wants_capture(conf: &NetConf) -> bool {
    let ann = &conf.runtime_config.pod_annotations;
    conf::opted_in(|k| ann.get(k).map(String::as_str))
}

fn pod(env: &Env) -> Option<PodRef> {
    Some(PodRef {
        namespace: env.pod_namespace.clone(),
        name: env.pod_name.clone(),
        uid: env.pod_uid.clone(),
    })
}

fn annotations(conf: &NetConf) -> std::collections::HashMap<String, String> {
    conf.runtime_config.pod_annotations.clone()
}

pub fn run(env: &Env, stdin: &[u8]) -> Result<Output, CniError> {
    if env.command == "VERSION" {
        return Ok(Output::Text(format!(
            r#"{{"cniVersion":"{LATEST_VERSION}","supportedVersions":{}}}"#,
            serde_json::to_string(SUPPORTED_VERSIONS).unwrap_or_default()
        )));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        // DEL never fails (see `del_lenient`).
        Err(e) if env.command == "DEL" => return Ok(del_lenient(env, stdin, &e)),
        // A pod that did not opt in is never failed by sluice, whatever the rest of its config
        // looks like: if the strict parse fails, a lenient look decides whether sluice is
        // asked at all, and if it is not, the config is passed on untouched.
        Err(e) => return conf::pass_through(&env.command, stdin).ok_or(e),
    };
    let version = conf.cni_version.clone();
    let result = match env.command.as_str() {
        "ADD" => add(env, &conf),
        "DEL" => Ok(del(env, &conf)),
        "CHECK" => check(env, &conf),
        "STATUS" => status(&conf),
        "GC" => gc(&conf),
        "" => Err(CniError::new(INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    };
    result.map_err(|e| e.in_version(&version))
}

/// ADD: program capture if the pod asked for it, then hand `prevResult` on unchanged.
fn add(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    if wants_capture(conf) {
        env.require_attach_fields()?;
        let request = AttachRequest {
            container_id: env.container_id.clone(),
            netns: env.netns.clone(),
            ifname: env.ifname.clone(),
            pod: pod(env),
            annotations: annotations(conf),
            pod_ips: conf.pod_ips(),
            network: conf.name.clone(),
        };
        let answer = agent::call(
            conf.socket(),
            conf.timeout(),
            request,
            |mut c, r| async move { c.attach(r).await },
        )?;
        crate::timing::agent(answer.timing.as_ref());
    }
    Ok(Output::Text(match &conf.prev_result {
        Some(prev) => prev.get().to_owned(),
        None => format!(r#"{{"cniVersion":"{}"}}"#, conf.cni_version),
    }))
}

/// DEL: best effort and always successful. The rules live in the pod's netns and die with it,
/// so an unreachable agent or a vanished netns must not block pod teardown: a DEL that fails
/// leaves the pod Terminating while the runtime retries, and its IP leaked.
fn del(env: &Env, conf: &NetConf) -> Output {
    if wants_capture(conf) {
        detach(env, conf.socket(), conf.timeout());
    }
    Output::Nothing
}

/// DEL with a config the strict parse refused (an unknown `cniVersion`, a field of the wrong
/// type): still exit 0, and still remove the capture when the pod may have one, reaching the
/// agent where the config says if that is readable, else at the defaults. What could not be
/// done goes to stderr (the runtime's log).
fn del_lenient(env: &Env, stdin: &[u8], refused: &CniError) -> Output {
    match conf::LenientDel::read(stdin) {
        Some(d) if d.opted_in => {
            eprintln!(
                "sluice-cni: DEL of {} with a config sluice does not accept ({}: {}); removing the capture anyway",
                env.container_id, refused.msg, refused.details
            );
            detach(env, &d.socket, d.timeout);
        }
        Some(_) => {}
        None => {
            eprintln!(
                "sluice-cni: DEL of {}: stdin is not a network config ({}); nothing to do, the rules go with the namespace",
                env.container_id, refused.msg
            );
        }
    }
    Output::Nothing
}

/// Asks the agent to remove the capture of this attachment; a failure is logged, never
/// returned.
fn detach(env: &Env, socket: &str, timeout: std::time::Duration) {
    if env.container_id.is_empty() {
        eprintln!("sluice-cni: DEL without CNI_CONTAINERID: nothing to remove");
        return;
    }
    let request = DetachRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
    };
    if let Err(e) = agent::call(socket, timeout, request, |mut c, r| async move {
        c.detach(r).await
    }) {
        eprintln!(
            "sluice-cni: DEL of {} continues without the agent: {}",
            env.container_id, e.msg
        );
    }
}

/// CHECK: fails when the agent finds our table missing or different from the plan.
///
/// While the agent cannot answer (not running, restarting, overloaded: code 11 from the call)
/// CHECK succeeds, saying so on stderr. The capture lives in the pod's kernel state, not in
/// the agent, so the agent's absence says nothing about the pod; and runtimes act on a failed
/// CHECK: CRI-O checks every pod when it restarts and does not restore the IP of one whose
/// CHECK failed (`Could not restore sandbox IP`), and it checks after every ADD. A DaemonSet
/// rollout of the agent must not touch running pods. What CHECK would have verified is
/// verified anyway when the agent is back: its reconciler compares every opted-in pod with its
/// plan and repairs the drift (`sluice_repairs_total`, the `SluiceCapturesRepaired`
/// alert) or reports it.
fn check(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    if !wants_capture(conf) {
        return Ok(Output::Nothing);
    }
    env.require_attach_fields()?;
    let request = CheckRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        annotations: annotations(conf),
        pod_ips: conf.pod_ips(),
        pod: pod(env),
    };
    let reply = match agent::call(
        conf.socket(),
        conf.timeout(),
        request,
        |mut c, r| async move { c.check(r).await },
    ) {
        Ok(reply) => reply,
        Err(e) if e.code == TRY_AGAIN_LATER => {
            eprintln!(
                "sluice-cni: CHECK of {} not verified, the agent cannot answer (its reconciler checks the pod when it is back): {}",
                env.container_id, e.msg
            );
            return Ok(Output::Nothing);
        }
        Err(e) => return Err(e),
    };
    if reply.ok {
        Ok(Output::Nothing)
    } else {
        Err(
            CniError::new(DRIFT, "sluice capture ruleset is missing or has drifted")
                .details(reply.drift.join("; ")),
        )
    }
}

/// STATUS: whether the plugin can work. Its config parsed (else the caller got that error), so
/// it can: pods that did not opt in never need the agent, and an opted-in pod's ADD fails
/// with code 11 while the agent is away (the runtime retries it until the agent is back). The
/// agent's own health is told by its readiness probe, metrics and alerts, not by taking the
/// node's network down: a runtime that asks STATUS marks the whole node not ready on an
/// error, and kubelet then admits no pod at all. With `statusRequiresAgent` the agent's
/// readiness is asked too (code 50 while it is unreachable or not ready).
fn status(conf: &NetConf) -> Result<Output, CniError> {
    if !conf.status_requires_agent {
        return Ok(Output::Nothing);
    }
    let reply = agent::call(
        conf.socket(),
        conf.timeout(),
        StatusRequest {},
        |mut c, r| async move { c.status(r).await },
    )
    .map_err(|e| CniError::new(NOT_AVAILABLE, e.msg))?;
    if reply.ready {
        Ok(Output::Nothing)
    } else {
        Err(CniError::new(
            NOT_AVAILABLE,
            format!("sluice agent is not ready: {}", reply.reason),
        ))
    }
}

/// GC (CNI 1.1) of this network: detach every attachment the agent knows that was made
/// through this network (its `name`) and whose (container, interface) is not among the
/// runtime's valid attachments (their netns are gone or going). The runtime sends GC per
/// network, listing that network's attachments only, so another network's attachment, or one
/// whose network is unknown (recorded by an earlier release), is never touched. A valid
/// attachment is never touched, and a stale interface of a pod that is still attached on
/// another keeps the pod's capture (the agent removes it only with the last attachment). One
/// failed cleanup does not stop the others; all failures are reported.
fn gc(conf: &NetConf) -> Result<Output, CniError> {
    let network = sluice_proto::network_name(&conf.name);
    let valid: std::collections::HashSet<(&str, &str)> = conf
        .valid_attachments()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    // An attachment recorded without an interface name (an older agent) is valid if its
    // container is valid on any interface.
    let valid_ids: std::collections::HashSet<&str> = valid.iter().map(|(id, _)| *id).collect();
    let is_valid = |a: &sluice_proto::v1::Attachment| {
        if a.network != network {
            // Not this network's to collect (another network's, or unknown).
            return true;
        }
        if a.ifname.is_empty() {
            valid_ids.contains(a.container_id.as_str())
        } else {
            valid.contains(&(a.container_id.as_str(), a.ifname.as_str()))
        }
    };
    let list = agent::call(
        conf.socket(),
        conf.timeout(),
        ListRequest {},
        |mut c, r| async move { c.list(r).await },
    )?;
    let mut failures = Vec::new();
    for stale in list.attachments.into_iter().filter(|a| !is_valid(a)) {
        let id = format!("{}/{}", stale.container_id, stale.ifname);
        let request = DetachRequest {
            container_id: stale.container_id,
            netns: stale.netns,
            ifname: stale.ifname,
        };
        if let Err(e) = agent::call(
            conf.socket(),
            conf.timeout(),
            request,
            |mut c, r| async move { c.detach(r).await },
        ) {
            failures.push((id, e));
        }
    }
    match failures.as_slice() {
        [] => Ok(Output::Nothing),
        [(_, first), ..] => Err(CniError::new(
            first.code,
            format!("GC could not clean {} stale attachment(s)", failures.len()),
        )
        .details(
            failures
                .iter()
                .map(|(id, e)| format!("{id}: {}", e.msg))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}
