//! Everything that runs inside a pod's network namespace: entering and vetting it (`netns`),
//! the nftables batch (`nft`, the only user of libnftnl), the device steps through rtnetlink
//! and sysctls (`device`), the capture's steps with their rollback (`capture`), and the
//! start-up probe of what the kernel can do (`probe`).

pub mod capture;
pub mod device;
pub mod netns;
pub mod nft;
pub mod probe;
