//! The rules every method programs: istio-cni's golden `basic` (a default sidecar pod).

/// In iptables-restore form.
pub const ISTIO_IPT: &str = include_str!("../rules/istio-default.ipt");
/// The same pod in Istio's native nftables form (`nft -f`).
pub const ISTIO_NFT: &str = include_str!("../rules/istio-default.nft");
