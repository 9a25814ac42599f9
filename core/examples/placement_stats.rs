//! Prints how evenly `ConsistentHashing` spreads buckets and how much data
//! moves when a node is added, for the README's placement figures.
//!
//!     cargo run --release -p kv-core --example placement_stats

use std::collections::BTreeSet;

use kv_core::{BUCKETS, Placement, PlacementSpec, Strategy};

fn spec(factor: u32, nodes: u32) -> PlacementSpec {
    PlacementSpec {
        strategy: Strategy::ConsistentHashing,
        factor,
        members: (0..nodes).collect(),
    }
}

fn main() {
    println!(
        "| nodes | factor | most loaded / mean | least loaded / mean | replicas moved adding a node | ideal (1/(N+1)) |"
    );
    println!("|---|---|---|---|---|---|");
    for nodes in [3u32, 5, 7, 10] {
        for factor in [1u32, 2, 3] {
            let p = Placement::new(&spec(factor, nodes));
            let loads: Vec<f64> = (0..nodes).map(|m| p.buckets_of(m).len() as f64).collect();
            let mean = loads.iter().sum::<f64>() / loads.len() as f64;
            let max = loads.iter().cloned().fold(f64::MIN, f64::max) / mean;
            let min = loads.iter().cloned().fold(f64::MAX, f64::min) / mean;
            let grown = Placement::new(&spec(factor, nodes + 1));
            let moved: usize = (0..BUCKETS)
                .map(|b| {
                    let old: BTreeSet<_> = p.owners(b).iter().collect();
                    grown.owners(b).iter().filter(|o| !old.contains(o)).count()
                })
                .sum();
            let moved = moved as f64 / (f64::from(BUCKETS) * f64::from(factor));
            println!(
                "| {nodes} | {factor} | {max:.3} | {min:.3} | {:.1}% | {:.1}% |",
                moved * 100.0,
                100.0 / f64::from(nodes + 1)
            );
        }
    }
}
