//! Criterion micro-benchmarks of the OpenMesh dataplane live in `benches/benches/`; run them with
//! `cargo bench -p openmesh-benches`. Results and how they were measured: `benches/RESULTS.md`.
