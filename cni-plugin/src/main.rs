//! `sluice-cni`: a chained CNI plugin. Thin and stateless: it reads the runtime's request,
//! forwards pods that opted in to `sluice-agent` over gRPC, passes `prevResult` through, and
//! prints a CNI result or error. Pods that did not opt in never reach the agent.
#![forbid(unsafe_code)]

mod agent;
mod cni;
mod timing;
mod verbs;

use std::io::{Read, Write};

use crate::cni::Output;
use crate::cni::config::{self as conf};
use crate::cni::env::Env;
use crate::cni::error::{AGENT_FAILED, CniError, DECODE_FAILURE};

fn main() {
    timing::mark("main");
    let env = Env::from_env(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    // One byte past the limit tells "too large" from "exactly at it" without reading more.
    let read = std::io::stdin()
        .take(conf::MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin)
        .and_then(|n| {
            if n > conf::MAX_STDIN {
                Err(std::io::Error::other(format!(
                    "the network config on stdin is larger than {} bytes; input begins: {}",
                    conf::MAX_STDIN,
                    conf::excerpt(&stdin)
                )))
            } else {
                Ok(n)
            }
        });
    // A panic would print Rust's message instead of CNI JSON: turn it into a CNI error.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = match read {
        Err(e) if env.command != "VERSION" => {
            Err(CniError::new(DECODE_FAILURE, format!("reading stdin: {e}")))
        }
        _ => std::panic::catch_unwind(|| verbs::run(&env, &stdin))
            .unwrap_or_else(|_| Err(CniError::new(AGENT_FAILED, "sluice-cni: internal error"))),
    };
    // DEL never fails: whatever went wrong is said on stderr, and the runtime goes on.
    let outcome = match outcome {
        Err(e) if env.command == "DEL" => {
            eprintln!(
                "sluice-cni: DEL of {}: {} {}",
                env.container_id, e.msg, e.details
            );
            Ok(Output::Nothing)
        }
        other => other,
    };
    let mut out = std::io::stdout().lock();
    let code = match outcome {
        Ok(Output::Nothing) => 0,
        Ok(Output::Text(text)) => {
            let _ = writeln!(out, "{text}");
            0
        }
        Err(e) => {
            let _ = writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default());
            1
        }
    };
    let _ = out.flush();
    timing::mark("done");
    timing::print();
    std::process::exit(code);
}

#[cfg(test)]
mod proptests;
