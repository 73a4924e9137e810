//! `sluice-bench`: placeholder until the benchmark issue lands; it says so and exits non-zero
//! so nobody mistakes it for a result.
fn main() {
    eprintln!("sluice-bench is not built yet (see the benchmark issue)");
    std::process::exit(2);
}
